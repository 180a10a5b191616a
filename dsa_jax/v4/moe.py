# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""V4 MoE (docs/v4.md §MoE): sqrt-softplus router, hash-routed first layers, clamped SwiGLU.

Router: s = sqrt(softplus(x·W_g)) in fp32 (V4's `score_func`; sigmoid and softmax also accepted).
Learned layers choose the top-k of s + bias (the bias, balanced by `dsa_jax.moe.update_router_bias`,
only selects; no expert groups in V4); hash layers (the first n_hash_layers) take the k experts of
a frozen token → experts table instead. Either way the combine weights are the unbiased s of the
chosen experts, normalised to sum 1 (not for softmax) and times route_scale. Routed experts clamp
their SwiGLU inputs (gate ≤ L, up ∈ [−L, L], L = swiglu_limit); the shared expert does not (as in
DeepSeek's released reference). Dropless dispatch with `jax.lax.ragged_dot`.

Letters: B batch, T tokens, N = B·T, D model dim, F expert hidden, E experts, k active.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsa_jax import layers, moe
from dsa_jax.v4.config import V4Config


class HashTable(nnx.Variable):
  """tid2eid [vocab, k]: a hash layer's token → experts table (frozen, not a parameter)."""


def hash_table(cfg: V4Config) -> np.ndarray:
  """A stand-in table with k distinct experts per token (checkpoints bring the real one)."""
  e, k = cfg.n_routed_experts, cfg.n_activated_experts
  tok = np.arange(cfg.vocab_size)[:, None]
  return ((tok * 7 + np.arange(k)[None] * (e // k)) % e).astype(np.int32)


def router_scores(logits, score_func: str):
  """Router logits [N,E] f32 -> scores [N,E] f32."""
  if score_func == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  if score_func == "sigmoid":
    return jax.nn.sigmoid(logits)
  return jnp.sqrt(jax.nn.softplus(logits))


def combine_weights(scores, ids, cfg: V4Config):
  """The unbiased scores of the chosen experts, normalised (not for softmax), times route_scale."""
  w = jnp.take_along_axis(scores, ids, axis=-1)
  if cfg.score_func != "softmax":
    w = w / jnp.sum(w, axis=-1, keepdims=True)
  return w * cfg.route_scale


def route(scores, bias, cfg: V4Config):
  """scores [N,E], bias [E] -> ids [N,k] (top-k of scores + bias), weights [N,k]."""
  _, ids = jax.lax.top_k(scores + bias[None, :], cfg.n_activated_experts)
  return ids, combine_weights(scores, ids, cfg)


def swiglu(h1, h3, limit: float):
  """silu(min(h1, L)) · clip(h3, −L, L); L = 0: unclamped."""
  if limit:
    h1, h3 = jnp.minimum(h1, limit), jnp.clip(h3, -limit, limit)
  return jax.nn.silu(h1) * h3


class V4MoE(nnx.Module):
  def __init__(self, cfg: V4Config, hashed: bool, *, rngs: nnx.Rngs):
    self.cfg, self.hashed = cfg, hashed
    d, f, e = cfg.dim, cfg.moe_inter_dim, cfg.n_routed_experts
    pd = layers.dtype_of(cfg.param_dtype)
    self.gate = layers.Linear(d, e, ("embed", "experts_r"), cfg, rngs=rngs)
    if hashed:
      self.tid2eid = HashTable(jnp.asarray(hash_table(cfg)), logical_axes=("hash", "hash"))
    else:
      self.gate_bias = layers.RouterBias(jnp.zeros((e,), jnp.float32), logical_axes=("experts_r",))
    self.w1 = layers.param(rngs, (e, d, f), ("experts", "embed", "mlp"), cfg.init_std, pd)
    self.w2 = layers.param(rngs, (e, f, d), ("experts", "mlp", "embed"), cfg.init_std, pd)
    self.w3 = layers.param(rngs, (e, d, f), ("experts", "embed", "mlp"), cfg.init_std, pd)
    self.shared_experts = (
      moe.MLP(d, cfg.n_shared_experts * f, cfg, rngs=rngs) if cfg.n_shared_experts else None
    )

  def route(self, x, tokens):
    """x [N,D], tokens [N] -> ids [N,k], weights [N,k] (f32)."""
    logits = jnp.einsum(
      "nd,de->ne", x.astype(jnp.float32), self.gate.kernel[...].astype(jnp.float32)
    )
    scores = router_scores(logits, self.cfg.score_func)
    if self.hashed:
      ids = self.tid2eid[...][tokens]
      return ids, combine_weights(scores, ids, self.cfg)
    return route(scores, self.gate_bias[...], self.cfg)

  def __call__(self, x, tokens):
    """x [B,T,D], tokens [B,T] -> (y [B,T,D], load [E] = tokens routed to each expert)."""
    cfg = self.cfg
    b, t, d = x.shape
    e, kk = cfg.n_routed_experts, cfg.n_activated_experts
    cd = layers.dtype_of(cfg.compute_dtype)
    xf = x.reshape(b * t, d)
    ids, w = self.route(xf, tokens.reshape(-1))
    flat = ids.reshape(-1)  # [N·k], sorted by expert for the grouped GEMMs
    order = jnp.argsort(flat, stable=True)
    token = order // kk
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    xs = xf[token].astype(cd)
    w1, w2, w3 = (p[...].astype(cd) for p in (self.w1, self.w2, self.w3))
    h1 = jax.lax.ragged_dot(xs, w1, sizes, preferred_element_type=jnp.float32)
    h3 = jax.lax.ragged_dot(xs, w3, sizes, preferred_element_type=jnp.float32)
    a = swiglu(h1, h3, cfg.swiglu_limit).astype(cd)
    ys = jax.lax.ragged_dot(a, w2, sizes, preferred_element_type=jnp.float32)
    ys = ys * w.reshape(-1)[order][:, None]
    y = jnp.zeros((b * t, d), jnp.float32).at[token].add(ys).reshape(b, t, d)
    if self.shared_experts is not None:
      y = y + self.shared_experts(x).astype(jnp.float32)
    return y.astype(x.dtype), jax.lax.stop_gradient(sizes.astype(jnp.float32))
