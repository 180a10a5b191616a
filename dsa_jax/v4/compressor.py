# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The V4 KV compressor (docs/v4.md §Compressor): learned per-channel softmax pooling of blocks.

For ratio m every token t gets a value row C_t = x_t·W_kv and a gate row Z_t = x_t·W_gate + ape[t mod m]
(c·K wide). Entry j pools, independently per channel, with weights softmax over the pooled rows:

- m = 4 (CSA, c = 2, overlapping): the first K channels of block j−1's 4 rows and the last K
  channels of block j's 4 rows, 8 rows in all (block −1 has gate −inf: weight 0);
- m > 4 (HCA, c = 1): the m rows of block j.

Then RMSNorm, RoPE on the last R dims at position j·m, and the numerics of the consumer (fp8 on the
no-rope dims for attention rows; Hadamard + fp4/fp8 for indexer keys). Only complete blocks
become entries (U = ⌊T/m⌋), and entry j reads tokens < (j+1)·m only, so query t may use it iff
j < (t+1)//m. Pooling runs in fp32.

Letters: B batch, T tokens, U entries, D model dim, K entry dim, m ratio.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_jax import layers
from dsa_jax.v4 import quant, rope
from dsa_jax.v4.config import V4Config


def pool(kv, score, ape, ratio: int):
  """kv, score [B,T,c·K] f32 (c = 2 iff ratio == 4), ape [m, c·K] -> entries [B,U,K] f32."""
  b, t, ck = kv.shape
  u = t // ratio
  if u == 0:  # T < m: no complete block yet
    return jnp.zeros((b, 0, ck // 2 if ratio == 4 else ck), kv.dtype)
  kv = kv[:, : u * ratio].reshape(b, u, ratio, ck)
  score = score[:, : u * ratio].reshape(b, u, ratio, ck) + ape
  if ratio == 4:
    k = ck // 2
    # Entry j: first halves of block j-1 (shifted down one block, block -1 = weight 0) and
    # second halves of block j.
    prev_kv = jnp.pad(kv[:, :-1, :, :k], ((0, 0), (1, 0), (0, 0), (0, 0)))
    prev_s = jnp.pad(
      score[:, :-1, :, :k], ((0, 0), (1, 0), (0, 0), (0, 0)), constant_values=-jnp.inf
    )
    kv = jnp.concatenate([prev_kv, kv[..., k:]], axis=2)  # [B,U,2m,K]
    score = jnp.concatenate([prev_s, score[..., k:]], axis=2)
  w = jax.nn.softmax(score, axis=2)
  return jnp.sum(w * kv, axis=2)


def quant_nope(x, cfg: V4Config):
  """fp8 round trip of the no-rope dims of attention rows (blocks of 64), rope dims kept."""
  if cfg.kv_quant == "none":
    return x
  r = cfg.rope_head_dim
  nope = quant.fp8_fake_quant(x[..., :-r], 64, cfg.scale_fmt)
  return jnp.concatenate([nope, x[..., -r:]], axis=-1)


class Compressor(nnx.Module):
  """Pools ratio-m blocks of x into U = T//m entries of width d (`indexer`: the indexer's keys)."""

  def __init__(
    self, cfg: V4Config, ratio: int, d: int, axis: str, *, rngs: nnx.Rngs, indexer=False
  ):
    self.cfg, self.ratio, self.indexer = cfg, ratio, indexer
    c = 2 if ratio == 4 else 1
    self.wkv = layers.Linear(cfg.dim, c * d, ("embed", axis), cfg, rngs=rngs)
    self.wgate = layers.Linear(cfg.dim, c * d, ("embed", axis), cfg, rngs=rngs)
    # Per-slot gate bias, fp32 as in the checkpoint; zero at init.
    self.ape = nnx.Param(
      jnp.zeros((ratio, c * d), jnp.float32), logical_axes=("compress_rows", axis)
    )
    self.norm = layers.RMSNorm(d, cfg.norm_eps)

  def rows(self, x):
    """x [B,T,D] -> the per-token value and gate rows C, Z [B,T,c·K] f32 (Z without `ape`)."""
    xf = x.astype(jnp.float32)
    kv = jnp.einsum("btd,dc->btc", xf, self.wkv.kernel[...].astype(jnp.float32))
    score = jnp.einsum("btd,dc->btc", xf, self.wgate.kernel[...].astype(jnp.float32))
    return kv, score

  def entries(self, pooled, first, dtype):
    """pooled [B,U,K] f32, first [U] or [B,U] (each block's first position j·m) -> entries:
    RMSNorm, RoPE at `first`, the consumer's numerics (fp32 for the indexer, else `dtype`)."""
    cfg = self.cfg
    cos, sin = rope.angles(cfg, first, compressed=True)
    c = rope.rope_tail(self.norm(pooled), cos, sin)
    if self.indexer:
      return quant.indexer_fake_quant(c, cfg.indexer_quant, cfg.scale_fmt)
    return quant_nope(c, cfg).astype(dtype)

  def __call__(self, x):
    """x [B,T,D] (normed block input) -> entries [B,U,K] (fp32 for the indexer, else x.dtype)."""
    m = self.ratio
    kv, score = self.rows(x)
    pooled = pool(kv, score, self.ape[...], m)
    return self.entries(pooled, jnp.arange(pooled.shape[1]) * m, x.dtype)  # position j·m
