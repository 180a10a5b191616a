# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Fake quantisation of V4 activations with straight-through gradients (docs/v4.md §Numerics).

DeepSeek's reference rounds activations in place at inference; here the round trip is a forward
value with an identity gradient, so training sees the served numerics (an open question of the
spec, resolved this way). Scales are per block of the last dim; a trailing partial block is
quantised on its own (the tiny test shapes have row widths that are not block multiples).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsa_jax import layers

FP4_MAX = 6.0  # largest e2m1 value


def _pow2_ceil(s):
  """Smallest power of two >= s (exact, from the exponent bits): ue8m0 scales."""
  m, e = jnp.frexp(s)
  return jnp.ldexp(jnp.ones_like(s), jnp.where(m > 0.5, e, e - 1))


def _blocked(fn, x, block: int):
  """Applies fn to [..., n, block] views of x's last dim (zero-padded to a block multiple)."""
  d = x.shape[-1]
  pad = (-d) % block
  xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x
  y = fn(xp.reshape(xp.shape[:-1] + (xp.shape[-1] // block, block)))
  return y.reshape(xp.shape)[..., :d]


def _ste(x, y):
  return x + jax.lax.stop_gradient(y.astype(x.dtype) - x)


def fp8_fake_quant(x, block: int = 64, scale_fmt: str | None = "ue8m0"):
  """e4m3 round trip with one scale per `block` values (the reference's no-rope row dims)."""

  def q(v):
    s = layers.fp8_scale(jnp.max(jnp.abs(v), axis=-1, keepdims=True), scale_fmt)
    v8 = jnp.clip(v / s, -layers.FP8_MAX, layers.FP8_MAX).astype(jnp.float8_e4m3fn)
    return v8.astype(jnp.float32) * s

  xf = jax.lax.stop_gradient(x).astype(jnp.float32)
  return _ste(x, _blocked(q, xf, block))


def fp4_fake_quant(x, block: int = 32):
  """e2m1 round trip (values 0, .5, 1, 1.5, 2, 3, 4, 6) with a power-of-two scale per block."""

  def q(v):
    s = _pow2_ceil(jnp.maximum(jnp.max(jnp.abs(v), axis=-1, keepdims=True), 1e-4) / FP4_MAX)
    return jnp.clip(v / s, -FP4_MAX, FP4_MAX).astype(jnp.float4_e2m1fn).astype(jnp.float32) * s

  xf = jax.lax.stop_gradient(x).astype(jnp.float32)
  return _ste(x, _blocked(q, xf, block))


def indexer_fake_quant(x, mode: str, scale_fmt: str | None = "ue8m0"):
  """The indexer's q / k numerics: Hadamard then fp4 (per 32) or fp8 (per vector); "none": as is."""
  if mode == "none":
    return x
  h = layers.hadamard(x)
  return fp4_fake_quant(h) if mode == "fp4" else fp8_fake_quant(h, x.shape[-1], scale_fmt)
