# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Causal dense attention with its f32 log-sum-exp on one Hopper GPU (the warm-up's target).

The warm-up's dense KL needs each head's lse of the attention the frozen model runs. cuDNN's flash
attention hands its lse back only in bf16 through the public API (too coarse for a KL target), so
the KL kernels used to rebuild it in a separate pass over all keys. This runs JAX's
warp-specialised Mosaic GPU flash-attention forward (`jax.experimental.pallas.ops.gpu.
attention_mgpu`, wgmma, TMA) with `save_residuals`, which returns the output and the f32 lse from
one pass.

That kernel computes softmax(q·kᵀ) without a scale, so the caller passes q already scaled (and
uses the same scaled q for anything that must match the lse, e.g. the KL target's logits); its
lse is in log2 units and is converted here. q, k and v share one head dim: v is zero-padded to
q's and the padding sliced off the output. The kernel stages its operands in f16 shared memory,
so bf16 inputs are cast to f16 (more mantissa than bf16; a value beyond f16's range, 65504,
becomes inf and the step's loss non-finite, which the trainer's finiteness guard reports). Under differentiation the output's gradient comes from
cuDNN's backward on the same inputs (the Mosaic kernel has no causal backward); the lse is a
statistic and carries none.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention_mgpu

# block_q 64 per compute warpgroup (two per CTA: 128 queries), block_kv 64, two stages in
# flight: q (2 x 64 x 192) + k, v (2 x 2 x 64 x 192) bf16 = 144 KiB of shared memory at V3.2's
# head dim 192; block_kv 128 would need 240 KiB (over Hopper's 227).
CONFIG = attention_mgpu.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, causal=True)


def supported(q, k, v) -> str | None:
  """None when the kernel takes these operands (q, k [B,T,H,K], v [B,T,H,V]), else why not."""
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    return f"needs q, k [B,T,H,K] and v [B,T,H,V] of one B,T,H; got {q.shape}, {k.shape}, {v.shape}"
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} (need one of bf16, f16)"
  t, d = q.shape[1], q.shape[-1]
  if d % 64 or d > 256 or v.shape[-1] > d:
    return f"head dims K={d}, V={v.shape[-1]} (need K a multiple of 64, <= 256, and V <= K)"
  if t % (2 * CONFIG.block_q):
    return f"T={t} (need a multiple of {2 * CONFIG.block_q})"
  return None


def _forward(q, k, v):
  dv = v.shape[-1]
  vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - dv))) if dv < q.shape[-1] else v
  f16 = lambda x: x.astype(jnp.float16)
  out, (lse2,) = attention_mgpu.attention(f16(q), f16(k), f16(vp), CONFIG, save_residuals=True)
  lse = jnp.swapaxes(lse2, 1, 2) * jnp.float32(math.log(2.0))  # [B,H,T] log2 -> [B,T,H] ln
  return out[..., :dv].astype(q.dtype), lse


def _cudnn(q, k, v):
  dv = v.shape[-1]
  vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - dv))) if dv < q.shape[-1] else v
  out = jax.nn.dot_product_attention(q, k, vp, scale=1.0, is_causal=True, implementation="cudnn")
  return out[..., :dv]


@jax.custom_vjp
def causal_attention_lse(q, k, v):
  """(out [B,T,H,V] in q's dtype, lse [B,T,H] f32) of causal softmax(q·kᵀ)·v (q pre-scaled)."""
  return _forward(q, k, v)


def _fwd(q, k, v):
  return _forward(q, k, v), (q, k, v)


def _bwd(res, cts):
  q, k, v = res
  _, vjp = jax.vjp(_cudnn, q, k, v)
  return vjp(cts[0])


causal_attention_lse.defvjp(_fwd, _bwd)


@functools.partial(jax.jit, static_argnames=("scale",))
def scaled_query(q, scale: float):
  """q·scale rounded once to q's dtype: the query both the kernel and the KL target use."""
  return (q.astype(jnp.float32) * jnp.float32(scale)).astype(q.dtype)
