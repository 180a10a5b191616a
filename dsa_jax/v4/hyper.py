# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Manifold-constrained hyper-connections (docs/v4.md §Hyper-connections).

The residual is M = hc_mult streams h [B,T,M,D]. Around each sub-layer F (attention, FFN):

    a       = RMSNorm_unweighted(flatten(h)) · W_fn          [B,T,X]  X = (2+M)·M, fp32
    pre     = σ(a[:M]·s0 + b[:M]) + ε                        [B,T,M]  collapse weights
    post    = 2·σ(a[M:2M]·s1 + b[M:2M])                      [B,T,M]  where F's output goes
    comb    = Sinkhorn(softmax_row(a[2M:]·s2 + b[2M:]) + ε)  [B,T,M,M] doubly stochastic
    x       = Σ_m pre_m · h_m                                → F(norm(x)) = f
    h'_n    = post_n · f + Σ_m comb[m,n] · h_m

Sinkhorn: one column normalisation, then (iters − 1) × (row, column), each with +ε in the
denominator; it ends on columns, so columns sum to 1 exactly and rows to within the iteration's
convergence. The head collapses the streams once more with its own sigmoid weights (no Sinkhorn).

Letters: B batch, T tokens, M streams, D model dim, X mixing logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_jax.v4.config import V4Config


def sinkhorn(logits, iters: int, eps: float):
  """[..., M, M] logits -> a doubly stochastic matrix (columns exact, rows converged)."""
  c = jax.nn.softmax(logits, axis=-1) + eps
  c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

  def step(c, _):
    c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
    return c / (jnp.sum(c, axis=-2, keepdims=True) + eps), None

  return jax.lax.scan(step, c, None, length=iters - 1)[0]


def _mix_logits(h, fn, eps: float):
  """RMS-normalised flattened streams times W_fn: [B,T,M,D] -> [B,T,X] f32."""
  hf = h.reshape(h.shape[:-2] + (-1,)).astype(jnp.float32)
  rs = jax.lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + eps)
  return jnp.einsum("btf,fx->btx", hf, fn.astype(jnp.float32)) * rs


class HyperConnection(nnx.Module):
  def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    m, x = cfg.hc_mult, cfg.hc_mix
    init = jax.nn.initializers.normal(cfg.init_std)
    self.fn = nnx.Param(
      init(rngs.params(), (m * cfg.dim, x), jnp.float32),
      logical_axes=("embed", "hc_mix"),
      init_std=cfg.init_std,
    )
    self.base = nnx.Param(jnp.zeros((x,), jnp.float32), logical_axes=("hc_mix",))
    self.scale = nnx.Param(jnp.ones((3,), jnp.float32), logical_axes=("hc_mix",), init_value=1.0)

  def weights(self, h):
    """h [B,T,M,D] -> pre [B,T,M], post [B,T,M], comb [B,T,M,M] (all f32)."""
    cfg, m = self.cfg, self.cfg.hc_mult
    a = _mix_logits(h, self.fn[...], cfg.norm_eps)
    s, b = self.scale[...], self.base[...]
    pre = jax.nn.sigmoid(a[..., :m] * s[0] + b[:m]) + cfg.hc_eps
    post = 2.0 * jax.nn.sigmoid(a[..., m : 2 * m] * s[1] + b[m : 2 * m])
    comb = (a[..., 2 * m :] * s[2] + b[2 * m :]).reshape(a.shape[:-1] + (m, m))
    return pre, post, sinkhorn(comb, cfg.hc_sinkhorn_iters, cfg.hc_eps)

  def __call__(self, h, sublayer):
    """h' = post·F(Σ pre·h) + combᵀ·h; sublayer(x [B,T,D]) -> (f [B,T,D], aux)."""
    pre, post, comb = self.weights(h)
    x = jnp.einsum("btm,btmd->btd", pre, h.astype(jnp.float32)).astype(h.dtype)
    f, aux = sublayer(x)
    out = post[..., None] * f.astype(jnp.float32)[:, :, None, :]
    out = out + jnp.einsum("btmn,btmd->btnd", comb, h.astype(jnp.float32))
    return out.astype(h.dtype), aux


class HyperHead(nnx.Module):
  """Final collapse of the M streams: x = Σ_m (σ(a_m·s + b_m) + ε)·h_m."""

  def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    m = cfg.hc_mult
    init = jax.nn.initializers.normal(cfg.init_std)
    self.fn = nnx.Param(
      init(rngs.params(), (m * cfg.dim, m), jnp.float32),
      logical_axes=("embed", "hc_mix"),
      init_std=cfg.init_std,
    )
    self.base = nnx.Param(jnp.zeros((m,), jnp.float32), logical_axes=("hc_mix",))
    self.scale = nnx.Param(jnp.ones((1,), jnp.float32), logical_axes=("hc_mix",), init_value=1.0)

  def __call__(self, h):
    a = _mix_logits(h, self.fn[...], self.cfg.norm_eps)
    pre = jax.nn.sigmoid(a * self.scale[...][0] + self.base[...]) + self.cfg.hc_eps
    return jnp.einsum("btm,btmd->btd", pre, h.astype(jnp.float32)).astype(h.dtype)
