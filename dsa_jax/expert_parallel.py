# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Expert parallelism for DeepSeekMoE: tokens stay where they are, routed copies travel.

Inside one `jax.shard_map` over the whole mesh (docs/architecture.md §Scale-out):
1. each device routes its own tokens (the router is tiny and replicated);
2. every routed copy goes to the shard that holds its expert: the copies are packed into a send
   buffer [ep, C, D] (one slot row per destination shard) and exchanged with one `all_to_all` over
   the expert mesh axes;
3. each shard runs its E/ep local experts as a grouped GEMM (grouped_matmul.ops.gmm with the
   model's impl: `jax.lax.ragged_dot` or, on GPUs, the Pallas-Triton kernels, which may run here
   because this is a shard_map) on the copies it received, sorted by local expert; empty slots
   carry the sentinel id E/ep and sort last, past Σ group sizes, where the grouped GEMM leaves
   zeros;
4. a second `all_to_all` returns the outputs, which are weighted and summed back per token.

Capacity/drop policy (`ModelConfig.moe_capacity_factor`):
- 0 (default) = dropless: C = n·k, the copies of all n local tokens fit even if every one picks the
  same shard, so the result equals the single-device MoE exactly (memory ep× the average need).
- f > 0: C = ceil(f·n·k/ep) per (source, destination) pair. Copies beyond C for a destination are
  dropped in token order (the last tokens of the local batch lose them first); a dropped copy
  contributes nothing (the token keeps its other experts and the shared expert, weights are not
  renormalised). The balancing bias (DeepSeek-V3 §2.1.2) keeps loads near n·k/ep, so f≈1.25-2
  drops little. Dropped copies are counted in the returned `dropped`.

The expert weights enter with only their expert dim split (the fsdp dims are all-gathered at the
boundary, ZeRO-3 style); their hidden dim F may be split over `tensor` (the rules' "mlp"), then the
expert outputs are summed over `tensor` before the return trip.
Letters: n local tokens, k experts per token, E experts, ep expert shards, C slots per pair.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsa_jax import layers, sharding
from pallas_kernels.grouped_matmul import ops as gmm_ops


def _axis(axes: tuple[str, ...]):
  return axes[0] if len(axes) == 1 else axes


def moe_routed(ctx: sharding.Context, x, gate_w, gate_bias, w1, w2, w3, route_fn, cfg):
  """Routed experts of one MoE layer under expert parallelism.

  Args:
    ctx: the mesh and rules (sharding.current()).
    x: [B,T,D] tokens; gate_w [D,E]; gate_bias [E]; w1, w3 [E,D,F]; w2 [E,F,D].
    route_fn: moe.route(scores [N,E], bias [E], cfg) -> (ids [N,k], weights [N,k]).
  Returns:
    y [B,T,D] f32 (routed part only), load [E] f32 (global tokens per expert, pre-drop),
    dropped () f32 (global number of dropped copies).
  """
  b, t, d = x.shape
  e, kk = cfg.n_routed_experts, cfg.n_activated_experts
  cd = layers.dtype_of(cfg.compute_dtype)
  x_spec = ctx.spec(("batch", "seq", "act_embed"), x.shape)
  tok_axes = tuple(a for s in x_spec if s is not None for a in ((s,) if isinstance(s, str) else s))
  ep_axes = ctx.axes("experts", e)
  tp_axes = tuple(
    a for a in ctx.axes("mlp", cfg.moe_inter_dim) if a not in ep_axes and a not in tok_axes
  )
  ep = math.prod(ctx.mesh.shape[a] for a in ep_axes)
  e_loc = e // ep
  w_in_spec = P(_axis(ep_axes) if ep_axes else None, None, _axis(tp_axes) if tp_axes else None)
  w_out_spec = P(w_in_spec[0], w_in_spec[2], None)

  def body(x, gate_w, gate_bias, w1, w2, w3):
    bl, tl, _ = x.shape
    n = bl * tl
    xf = x.reshape(n, d)
    logits = jnp.einsum("nd,de->ne", xf.astype(jnp.float32), gate_w.astype(jnp.float32))
    ids, wts = route_fn(jax.nn.sigmoid(logits), gate_bias, cfg)
    flat = ids.reshape(-1)  # [n·k], copy c belongs to token c // k
    load = jnp.bincount(flat, length=e).astype(jnp.float32)
    token = jnp.arange(n * kk) // kk
    w1, w2, w3 = (w.astype(cd) for w in (w1, w2, w3))
    if ep == 1:  # every expert is local: plain dropless grouped GEMM
      dest_x, local_id, keep, slot = xf[token], flat, None, None
    else:
      cap = (
        n * kk if cfg.moe_capacity_factor <= 0 else math.ceil(cfg.moe_capacity_factor * n * kk / ep)
      )
      cap = min(cap, n * kk)
      dest = flat // e_loc
      # Rank of each copy among the copies bound for the same shard, in token order.
      onehot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)
      pos = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - onehot, dest[:, None], 1)[:, 0]
      keep = pos < cap
      slot = jnp.where(keep, dest * cap + pos, ep * cap)  # ep·cap = out of range: dropped
      send = jnp.zeros((ep * cap, d), cd).at[slot].set(xf[token].astype(cd), mode="drop")
      send_id = jnp.full((ep * cap,), e_loc, jnp.int32).at[slot].set(flat % e_loc, mode="drop")
      ax = _axis(ep_axes)
      dest_x = jax.lax.all_to_all(send.reshape(ep, cap, d), ax, 0, 0, tiled=True)
      local_id = jax.lax.all_to_all(send_id.reshape(ep, cap), ax, 0, 0, tiled=True)
      dest_x, local_id = dest_x.reshape(ep * cap, d), local_id.reshape(ep * cap)
    order = jnp.argsort(local_id, stable=True)
    sizes = jnp.bincount(local_id, length=e_loc + 1)[:e_loc].astype(jnp.int32)
    xs = dest_x[order].astype(cd)
    gmm = lambda lhs, rhs: gmm_ops.gmm(
      lhs, rhs, sizes, preferred_element_type=jnp.float32, impl=cfg.impl
    )
    h1, h3 = gmm(xs, w1), gmm(xs, w3)
    a = (jax.nn.silu(h1) * h3).astype(cd)
    ys = gmm(a, w2)
    if tp_axes:  # F was split over tensor: partial sums
      ys = jax.lax.psum(ys, _axis(tp_axes))
    ys = jnp.zeros_like(ys).at[order].set(ys)  # back to slot order
    if ep == 1:
      y_copy = ys
      dropped = jnp.zeros((), jnp.float32)
    else:
      back = jax.lax.all_to_all(ys.reshape(ep, cap, d), _axis(ep_axes), 0, 0, tiled=True)
      back = back.reshape(ep * cap, d)
      y_copy = jnp.where(keep[:, None], back[jnp.minimum(slot, ep * cap - 1)], 0.0)
      dropped = jnp.sum(~keep).astype(jnp.float32)
    y = jnp.zeros((n, d), jnp.float32).at[token].add(y_copy * wts.reshape(-1)[:, None])
    if tok_axes:  # global statistics: sum over the shards that hold different tokens
      load = jax.lax.psum(load, _axis(tok_axes))
      dropped = jax.lax.psum(dropped, _axis(tok_axes))
    return y.reshape(bl, tl, d), load, dropped

  fn = jax.shard_map(
    body,
    mesh=ctx.mesh,
    in_specs=(x_spec, P(), P(), w_in_spec, w_out_spec, w_in_spec),
    out_specs=(x_spec, P(), P()),
    check_vma=False,
  )
  return fn(x, gate_w, gate_bias, w1, w2, w3)
