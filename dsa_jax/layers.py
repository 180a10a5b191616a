# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Building blocks: Linear with logical axes, RMSNorm, LayerNorm, YaRN RoPE, Hadamard, FP8 quant.

Every parameter carries `logical_axes` metadata (one name per dim); `sharding.py` maps the names to
mesh axes through one rules table.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsa_jax import sparse_attention
from dsa_jax.config import ModelConfig

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class RouterBias(nnx.Variable):
  """MoE `e_score_correction_bias`: updated by the balancing rule, never by the optimizer."""


def param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
  """A normal(std) parameter; `init_std` metadata lets `model.build` re-create it on the host."""
  init = jax.nn.initializers.normal(std)
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes), init_std=std)


class Linear(nnx.Module):
  """y = x @ W, W stored [in, out] (the transpose of the HF/torch layout). Under
  remat_policy="save_projections" y is a named remat residual (sparse_attention.SAVED_PROJ)."""

  def __init__(self, d_in: int, d_out: int, axes, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=None):
    self.kernel = param(rngs, (d_in, d_out), axes, cfg.init_std, dtype or dtype_of(cfg.param_dtype))
    self.compute_dtype = dtype_of(cfg.compute_dtype) if dtype is None else dtype
    # Named only where a policy keeps it: `saved`'s optimization barrier would otherwise stop XLA
    # fusing the product with its consumers for nothing.
    self.save = cfg.remat and cfg.remat_policy == "save_projections"

  def __call__(self, x):
    w = self.kernel[...]
    y = jnp.einsum("...i,io->...o", x.astype(self.compute_dtype), w.astype(self.compute_dtype))
    return sparse_attention.saved(y, sparse_attention.SAVED_PROJ) if self.save else y


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * w in fp32 (docs/dsa.md §Model), cast back to the input dtype."""

  def __init__(self, d: int, eps: float, axis_name: str = "norm"):
    self.weight = nnx.Param(jnp.ones((d,), jnp.float32), logical_axes=(axis_name,))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.weight[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
  """Mean-centred LayerNorm with bias in fp32 (the indexer's k_norm)."""

  def __init__(self, d: int, eps: float):
    self.weight = nnx.Param(jnp.ones((d,), jnp.float32), logical_axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((d,), jnp.float32), logical_axes=("norm",))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + self.eps)
    return (y * self.weight[...] + self.bias[...]).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# RoPE / YaRN (docs/dsa.md §RoPE and YaRN)


@functools.lru_cache(maxsize=None)
def yarn_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """The R/2 YaRN-corrected frequencies f'_i (docs/dsa.md §RoPE and YaRN), float64 numpy."""
  r = cfg.qk_rope_head_dim
  base = cfg.rope_theta
  freqs = 1.0 / (base ** (np.arange(0, r, 2, dtype=np.float64) / r))
  if not cfg.yarn_active:
    return freqs

  def corr_dim(n_rot):
    return r * math.log(cfg.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(corr_dim(cfg.beta_fast)), 0)
  high = min(math.ceil(corr_dim(cfg.beta_slow)), r - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp, as the reference does
  ramp = np.clip((np.arange(r // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  smooth = 1.0 - ramp
  return freqs / cfg.rope_factor * (1 - smooth) + freqs * smooth


def rope_angles(cfg: ModelConfig, positions):
  """positions [..., T] int -> (cos, sin) [..., T, R/2] float32."""
  inv = jnp.asarray(yarn_inv_freq(cfg), jnp.float32)
  ang = positions.astype(jnp.float32)[..., None] * inv
  return jnp.cos(ang), jnp.sin(ang)


def rope_interleaved(x, cos, sin):
  """MLA RoPE: rotates pairs (x[2i], x[2i+1]) by θ_i; x [B,T,(H),R], cos/sin [B,T,R/2]."""
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., 0::2], xf[..., 1::2]
  if x.ndim == cos.ndim + 1:
    cos, sin = cos[..., None, :], sin[..., None, :]
  y1 = x1 * cos - x2 * sin
  y2 = x1 * sin + x2 * cos
  return jnp.stack([y1, y2], axis=-1).reshape(x.shape).astype(x.dtype)


def rope_half(x, cos, sin):
  """Indexer RoPE, NOT interleaved (docs/dsa.md §RoPE and YaRN): pairs (x[i], x[i + R/2])."""
  xf = x.astype(jnp.float32)
  h = x.shape[-1] // 2
  x1, x2 = xf[..., :h], xf[..., h:]
  if x.ndim == cos.ndim + 1:
    cos, sin = cos[..., None, :], sin[..., None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Hadamard rotation and FP8 quantisation of the indexer (docs/dsa.md §Indexer)


@functools.lru_cache(maxsize=None)
def hadamard_matrix(n: int) -> np.ndarray:
  """Orthonormal Sylvester Walsh-Hadamard matrix H_n / sqrt(n) (natural order), float32."""
  if n & (n - 1):
    raise ValueError(f"Hadamard size {n} must be a power of two")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return (h / np.sqrt(n)).astype(np.float32)


def hadamard(x):
  """Applies the orthonormal Hadamard on the last dim (symmetric: its own inverse)."""
  h = jnp.asarray(hadamard_matrix(x.shape[-1]))
  return jnp.einsum("...i,ij->...j", x.astype(jnp.float32), h).astype(x.dtype)


def fp8_scale(amax, scale_fmt: str | None):
  """Per-block scale: amax/448, or that rounded up to a power of two for ue8m0 (docs/dsa.md)."""
  s = jnp.maximum(amax, 1e-4) / FP8_MAX
  if scale_fmt == "ue8m0":
    # Exact power of two from the exponent bits (s = m·2^e, m in [0.5, 1)): round up unless m == 0.5.
    m, e = jnp.frexp(s)
    s = jnp.ldexp(jnp.ones_like(s), jnp.where(m > 0.5, e, e - 1))
  return s


def fp8_quantize(x, scale_fmt: str | None = "ue8m0"):
  """Per-vector (1 x last-dim block) e4m3 quantisation: (x_fp8, scale[..., 1] f32)."""
  xf = x.astype(jnp.float32)
  s = fp8_scale(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), scale_fmt)
  q = jnp.clip(xf / s, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
  return q, s


def fp8_quant_dequant(x, scale_fmt: str | None = "ue8m0"):
  """FP8 round trip with a straight-through gradient (so the indexer trains under FP8 numerics)."""
  q, s = fp8_quantize(jax.lax.stop_gradient(x), scale_fmt)
  y = (q.astype(jnp.float32) * s).astype(x.dtype)
  return x + jax.lax.stop_gradient(y - x)
