# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Causal dense attention on TPU through JAX's Pallas splash-attention kernels.

`causal_attention(q, k, v, scale=...)`: queries and keys are the same T positions (T = S), MHA
(k [B,S,H,K]) or MQA (k [B,S,K] shared by every head); V may be narrower than K. The forward
kernel keeps each row's f32 logsumexp (its softmax residual), so the warm-up's KL target and the
recall metrics take the lse from the kernel instead of a second pass over the keys. The
differentiable output comes from the kernel without residuals (splash's backward is defined for
that one); asking for the lse adds one forward under stop_gradient, the price of a frozen
teacher. The reference is the chunked XLA path of dsa_jax.sparse_attention.dense_attention.

A pallas_call is not auto-partitioned: `supported` takes one device, or a shard_map over every
mesh axis (each device its own batch rows and heads), and T a multiple of the block.
Letters: B batch, T queries, S keys (= T), H heads, K q/k dim, V value dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from pallas_kernels import _common

BLOCK = 512  # query / key tile of every splash kernel (capped at T)


def supported(q, k, v, interpret: bool = False, block: int = BLOCK) -> str | None:
  """None when the splash kernels take these shapes here, else why not (interpret: a CPU run,
  where the device rule does not apply)."""
  if q.ndim != 4 or k.ndim not in (3, 4) or v.ndim != k.ndim:
    return f"shapes q {q.shape}, k {k.shape}, v {v.shape} (need [B,T,H,K] and MHA or MQA k/v)"
  t = q.shape[1]
  if k.shape[1] != t:
    return f"T={t} queries over S={k.shape[1]} keys (the kernels need T = S)"
  b = min(block, t)
  if t % b or b % 128:
    return f"T={t} is not a multiple of the block {b} (itself a multiple of 128)"
  if not interpret and not _common.per_device():
    return "several devices outside a shard_map (a pallas_call is not auto-partitioned)"
  return None


@functools.lru_cache(maxsize=32)
def _kernel(t: int, h: int, mqa: bool, residuals: bool, interpret: bool, block: int):
  b = min(block, t)
  mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(h)])
  sizes = sk.BlockSizes(
    block_q=b,
    block_kv=b,
    block_kv_compute=b,
    block_q_dkv=b,
    block_kv_dkv=b,
    block_kv_dkv_compute=b,
    block_q_dq=b,
    block_kv_dq=b,
  )
  make = sk.make_splash_mqa if mqa else sk.make_splash_mha
  return make(
    mask,
    block_sizes=sizes,
    head_shards=1,
    q_seq_shards=1,
    save_residuals=residuals,
    interpret=interpret,
  )


def causal_attention(
  q, k, v, *, scale: float, with_lse: bool = True, interpret: bool = False, block: int = BLOCK
):
  """q [B,T,H,K], k [B,T,H,K] or [B,T,K], v like k with V -> out [B,T,H,V] (q.dtype), lse
  [B,T,H] f32 (None without with_lse). block: the query/key tile (capped at T)."""
  why = supported(q, k, v, interpret, block)
  if why is not None:
    raise ValueError(f"splash attention cannot take these inputs: {why}")
  t, h = q.shape[1], q.shape[2]
  mqa = k.ndim == 3
  qh = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [B,H,T,K]
  kh, vh = (k, v) if mqa else (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
  out = jax.vmap(_kernel(t, h, mqa, False, interpret, block))(qh, kh, vh.astype(q.dtype))
  lse = None
  if with_lse:
    _, (lse,) = jax.vmap(_kernel(t, h, mqa, True, interpret, block))(
      *jax.lax.stop_gradient((qh, kh, vh.astype(q.dtype)))
    )
    lse = jnp.swapaxes(lse.astype(jnp.float32), 1, 2)
  return jnp.swapaxes(out, 1, 2).astype(q.dtype), lse
