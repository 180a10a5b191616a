# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""DeepSeekMoE: sigmoid router with group limits and bias balancing, SwiGLU experts.

See docs/dsa.md §Model.

Router (noaux_tc): s = sigmoid(x W_g) in fp32; selection uses s + bias (bias only for selection);
group score = sum of the top-2 biased scores per group; keep the top n_limited_groups groups; pick
the top n_activated experts among them; combine with the UNBIASED s of the chosen experts,
normalised to sum 1, times route_scale. Output = Σ w_e·Expert_e(x) + SharedExpert(x).

Dispatch is dropless: token copies are sorted by expert and run through a grouped GEMM
(`pallas_kernels.grouped_matmul.ops.gmm` with the model's impl: `jax.lax.ragged_dot`, or the
Pallas-Triton kernels on a GPU), so no capacity factor and no dropped tokens. On a mesh (inside
`sharding.use_mesh_rules`) the routed experts run expert-parallel (expert_parallel.py: all_to_all
dispatch, dropless unless `moe_capacity_factor` > 0).
Letters: B batch, T tokens, N = B·T flat tokens, D model, F expert hidden, E experts, G groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_jax import expert_parallel, layers, sharding
from dsa_jax.config import ModelConfig
from pallas_kernels.grouped_matmul import ops as gmm_ops


class MLP(nnx.Module):
  """SwiGLU: w2(silu(w1 x) * (w3 x)), activation math in fp32."""

  def __init__(self, d: int, f: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.w1 = layers.Linear(d, f, ("embed", "mlp"), cfg, rngs=rngs)
    self.w2 = layers.Linear(f, d, ("mlp", "embed"), cfg, rngs=rngs)
    self.w3 = layers.Linear(d, f, ("embed", "mlp"), cfg, rngs=rngs)

  def __call__(self, x):
    a = jax.nn.silu(self.w1(x).astype(jnp.float32)) * self.w3(x).astype(jnp.float32)
    return self.w2(a.astype(x.dtype))


def route(scores, bias, cfg: ModelConfig):
  """scores [N,E] sigmoid probs (fp32), bias [E] -> (expert ids [N,k], combine weights [N,k])."""
  n, e = scores.shape
  g = cfg.n_expert_groups
  biased = scores + bias[None, :]
  if g > 1:
    grouped = biased.reshape(n, g, e // g)
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [N,G]
    _, keep = jax.lax.top_k(group_scores, cfg.n_limited_groups)
    group_mask = jnp.zeros((n, g), jnp.bool_).at[jnp.arange(n)[:, None], keep].set(True)
    expert_mask = jnp.repeat(group_mask, e // g, axis=1)
    biased = jnp.where(expert_mask, biased, -jnp.inf)
  _, ids = jax.lax.top_k(biased, cfg.n_activated_experts)
  w = jnp.take_along_axis(scores, ids, axis=-1)  # unbiased scores combine (bias: selection only)
  w = w / jnp.sum(w, axis=-1, keepdims=True) * cfg.route_scale
  return ids, w


class MoE(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f, e = cfg.dim, cfg.moe_inter_dim, cfg.n_routed_experts
    pd = layers.dtype_of(cfg.param_dtype)
    self.gate = layers.Linear(d, e, ("embed", "experts_r"), cfg, rngs=rngs)
    self.gate_bias = layers.RouterBias(jnp.zeros((e,), jnp.float32), logical_axes=("experts_r",))
    self.w1 = layers.param(rngs, (e, d, f), ("experts", "embed", "mlp"), cfg.init_std, pd)
    self.w2 = layers.param(rngs, (e, f, d), ("experts", "mlp", "embed"), cfg.init_std, pd)
    self.w3 = layers.param(rngs, (e, d, f), ("experts", "embed", "mlp"), cfg.init_std, pd)
    if cfg.n_shared_experts:
      self.shared_experts = MLP(d, cfg.n_shared_experts * f, cfg, rngs=rngs)
    else:
      self.shared_experts = None

  def __call__(self, x):
    """x [B,T,D] -> (y [B,T,D], load [E] = tokens routed to each expert)."""
    cfg = self.cfg
    b, t, d = x.shape
    e, kk = cfg.n_routed_experts, cfg.n_activated_experts
    cd = layers.dtype_of(cfg.compute_dtype)
    ctx = sharding.current()
    if ctx is not None:  # on a mesh: local routing + all_to_all dispatch (expert_parallel.py)
      ws = (self.gate.kernel[...], self.gate_bias[...], self.w1[...], self.w2[...], self.w3[...])
      y, sizes, _ = expert_parallel.moe_routed(ctx, x, *ws, route, cfg)
      if self.shared_experts is not None:
        y = y + self.shared_experts(x).astype(jnp.float32)
      return y.astype(x.dtype), jax.lax.stop_gradient(sizes)
    xf = x.reshape(b * t, d)
    logits = jnp.einsum(
      "nd,de->ne", xf.astype(jnp.float32), self.gate.kernel[...].astype(jnp.float32)
    )
    scores = jax.nn.sigmoid(logits)
    ids, w = route(scores, self.gate_bias[...], cfg)
    flat = ids.reshape(-1)  # [N·k]
    order = jnp.argsort(flat, stable=True)
    token = order // kk
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    xs = xf[token].astype(cd)
    w1, w2, w3 = (p[...].astype(cd) for p in (self.w1, self.w2, self.w3))
    gmm = lambda lhs, rhs: gmm_ops.gmm(
      lhs, rhs, sizes, preferred_element_type=jnp.float32, impl=cfg.impl
    )
    h1, h3 = gmm(xs, w1), gmm(xs, w3)
    a = (jax.nn.silu(h1) * h3).astype(cd)
    ys = gmm(a, w2)
    ys = ys * w.reshape(-1)[order][:, None]
    y = jnp.zeros((b * t, d), jnp.float32).at[token].add(ys)
    y = y.reshape(b, t, d)
    if self.shared_experts is not None:
      y = y + self.shared_experts(x).astype(jnp.float32)
    return y.astype(x.dtype), jax.lax.stop_gradient(sizes.astype(jnp.float32))


def update_router_bias(bias, load, rate: float):
  """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): raise under-loaded experts' bias.

  bias, load [..., E]; returns bias + rate·sign(mean(load) - load).
  """
  mean = jnp.mean(load, axis=-1, keepdims=True)
  return bias + rate * jnp.sign(mean - load)
