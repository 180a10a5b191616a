# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Grouped matmul references: `jax.lax.ragged_dot`, and per-group masked einsums for tiny shapes.

gmm(lhs [M,K], rhs [E,K,N], group_sizes [E]) -> out [M,N]: the rows of lhs are sorted by group;
rows [s_e, s_e + group_sizes[e]) (s_e = Σ_{e'<e} group_sizes[e']) are multiplied by rhs[e]. Rows
past Σ group_sizes belong to no group and come out zero (ragged_dot's semantics).
tgmm(lhs [M,K], dout [M,N], group_sizes [E]) -> [E,K,N]: d_rhs[e] = lhs_eᵀ · dout_e, the weight
gradient of gmm. The masked forms hold an [E,M,*] array: tests at tiny shapes only.
"""

import jax
import jax.numpy as jnp


def gmm_reference(lhs, rhs, group_sizes, *, preferred_element_type=None, precision=None):
  """out [M,N] = ragged_dot(lhs [M,K], rhs [E,K,N], group_sizes [E])."""
  return jax.lax.ragged_dot(
    lhs,
    rhs,
    group_sizes,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )


def group_ids(group_sizes, m: int):
  """[M] int32: the group of each row; E (no group) for the rows past Σ group_sizes."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def gmm_masked(lhs, rhs, group_sizes, *, preferred_element_type=jnp.float32):
  """out [M,N] = Σ_e [row in group e] · lhs · rhs[e], as one einsum over an [E,M] mask."""
  e = rhs.shape[0]
  mask = group_ids(group_sizes, lhs.shape[0])[None, :] == jnp.arange(e)[:, None]  # [E,M]
  full = jnp.einsum(
    "mk,ekn->emn",
    lhs,
    rhs,
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=preferred_element_type,
  )
  return jnp.sum(jnp.where(mask[:, :, None], full, 0), axis=0)


def tgmm_masked(lhs, dout, group_sizes, *, preferred_element_type=jnp.float32):
  """d_rhs [E,K,N] = lhs_eᵀ · dout_e per group e (rows outside every group contribute nothing)."""
  e = group_sizes.shape[0]
  mask = group_ids(group_sizes, lhs.shape[0])[None, :] == jnp.arange(e)[:, None]  # [E,M]
  return jnp.einsum(
    "em,mk,mn->ekn",
    mask.astype(lhs.dtype),
    lhs,
    dout,
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=preferred_element_type,
  )
