# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Pure-JAX sparse MLA over gathered top-k latent rows (MQA mode): the spec for the kernels.

DSA attention (docs/dsa.md §Sparse attention): query t attends only to the selected latent rows
kv[idx[t, :]] (576 = 512 latent + 64 rope), values are the first `d_v` dims of the same rows.
Invalid slots (idx < 0 or idx >= S) are skipped; a row with no valid slot gives out = 0 and
lse = +inf (FlashMLA's convention, so exp(logit - lse) = 0 for it).

Letters: B batch, T queries, S keys, H heads, K qk dim (576), V value dim (512), k selected slots.
"""

import jax
import jax.numpy as jnp

from pallas_kernels import _common


def _gather_rows(kv, idx):
  """kv [B,S,K], idx [B,T,k] -> valid [B,T,k], rows [B,T,k,K] (row 0 where invalid)."""
  s = kv.shape[1]
  valid = (idx >= 0) & (idx < s)
  safe = jnp.where(valid, idx, 0)
  rows = jax.vmap(lambda kv_b, i_b: kv_b[i_b])(kv, safe)
  return valid, rows


def _block(q, kv, idx, *, scale, d_v):
  valid, rows = _gather_rows(kv, idx)  # [B,t,k], [B,t,k,K]
  logits = jnp.einsum("bthc,btsc->bths", q, rows, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(valid[:, :, None, :], logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(logits - m_safe)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  any_valid = denom > 0
  p = jnp.where(any_valid, e / jnp.where(any_valid, denom, 1.0), 0.0)
  lse = jnp.where(any_valid, m_safe + jnp.log(jnp.where(any_valid, denom, 1.0)), jnp.inf)[..., 0]
  out = jnp.einsum(
    "bths,btsv->bthv", p.astype(rows.dtype), rows[..., :d_v], preferred_element_type=jnp.float32
  )
  return out.astype(q.dtype), lse


def sparse_mla_reference(q, kv, idx, *, scale: float, d_v: int, block_t: int = 256):
  """Sparse MQA-mode attention.

  Args:
    q: [B,T,H,K] queries in the absorbed latent space ([q_nope·W_UK ; q_pe]).
    kv: [B,S,K] latent rows ([c_kv ; k_pe]); values are kv[..., :d_v].
    idx: [B,T,k] int32 selected rows, invalid < 0 or >= S.
    scale: softmax scale (0.13523378 for V3.2, docs/dsa.md §MLA).
    d_v: value dim (512 for V3.2).
    block_t: queries per chunk, so the gathered [B,t,k,K] rows stay small.
  Returns:
    out [B,T,H,V] in q.dtype, lse [B,T,H] float32 (natural log, +inf for rows with no valid slot).
  """
  fn = lambda qb, ib: _block(qb, kv, ib, scale=scale, d_v=d_v)
  return _common.map_query_blocks(fn, block_t, [q, idx])


def sparse_mla_probs_reference(q, kv, idx, lse, *, scale: float, block_t: int = 256):
  """Head-mean attention probabilities at the selected slots: the sparse KL target (docs/dsa.md).

  p[b,t,s] = (1/H) Σ_h exp(scale·q[b,t,h]·kv[b,idx[b,t,s]] - lse[b,t,h]); 0 at invalid slots.
  Since each head's probabilities sum to 1 over S_t, p sums to 1 over the valid slots (the
  L1-normalised head sum of the spec). Not differentiable by design (the target is a constant).

  Returns: [B,T,k] float32.
  """

  def fn(qb, ib, lb):
    valid, rows = _gather_rows(kv, ib)
    logits = jnp.einsum("bthc,btsc->bths", qb, rows, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(logits - lb[..., None])
    p = jnp.where(valid[:, :, None, :], p, 0.0)
    return jnp.mean(p, axis=2)

  return jax.lax.stop_gradient(_common.map_query_blocks(fn, block_t, [q, idx, lse]))
