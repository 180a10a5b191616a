# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""V4 RoPE (docs/v4.md §RoPE): interleaved pairs on the LAST rope_head_dim dims of a row.

Two frequency tables: window-only layers use rope_theta without YaRN; CSA/HCA layers (queries,
window rows, compressed entries and their indexer) use compress_rope_theta with YaRN whenever
original_seq_len > 0, at every position (it rescales the slow pairs, so it is not a no-op at short
context). The softmax scale never gets a YaRN mscale in V4.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from dsa_jax.v4.config import V4Config


def yarn_range(cfg: V4Config) -> tuple[float, float]:
  """(low, high) pair indices of the YaRN ramp of the compressed layers' table."""
  r, base = cfg.rope_head_dim, cfg.compress_rope_theta

  def corr_dim(n_rot):
    return r * math.log(cfg.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(corr_dim(cfg.beta_fast)), 0)
  high = min(math.ceil(corr_dim(cfg.beta_slow)), r - 1)
  return low, (high + 0.001 if low == high else high)


@functools.lru_cache(maxsize=None)
def inv_freq(cfg: V4Config, compressed: bool) -> np.ndarray:
  """The R/2 frequencies of a window-only (compressed=False) or a CSA/HCA layer, float64."""
  r = cfg.rope_head_dim
  base = cfg.compress_rope_theta if compressed else cfg.rope_theta
  freqs = 1.0 / (base ** (np.arange(0, r, 2, dtype=np.float64) / r))
  if not compressed or cfg.original_seq_len == 0:
    return freqs
  low, high = yarn_range(cfg)
  ramp = np.clip((np.arange(r // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  return freqs / cfg.rope_factor * ramp + freqs * (1 - ramp)


def angles(cfg: V4Config, positions, compressed: bool):
  """positions [..., T] int -> (cos, sin) [..., T, R/2] float32."""
  ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(
    inv_freq(cfg, compressed), jnp.float32
  )
  return jnp.cos(ang), jnp.sin(ang)


def rope_tail(x, cos, sin, *, inverse: bool = False):
  """Rotates the last R = 2·cos.shape[-1] dims of x in interleaved pairs; inverse: the conjugate.

  x [B,T,K] or [B,T,H,K]; cos/sin [T,R/2] or per request [B,T,R/2]. The inverse rotation of an attention output at the
  query position turns Σ_s p_s·R(s)·v_s into Σ_s p_s·R(s − t)·v_s: values carry relative positions.
  """
  r = 2 * cos.shape[-1]
  if x.ndim == 4:
    cos, sin = cos[..., None, :], sin[..., None, :]
  sin = -sin if inverse else sin
  xf = x[..., -r:].astype(jnp.float32)
  x1, x2 = xf[..., 0::2], xf[..., 1::2]
  tail = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(xf.shape)
  return jnp.concatenate([x[..., :-r], tail.astype(x.dtype)], axis=-1)
