# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Context parallelism for DSA: the sequence is split over the `sequence` mesh axis.

Scheme (docs/architecture.md §Scale-out): queries stay on their shard; the two per-token things
every query may need from other shards, the indexer keys (Dᵢ = 128 values, 128 B in FP8) and the MLA
latent rows ([c_kv ; k_pe], 576 values, 1.1 KB in bf16), are all-gathered over `sequence` inside one
`jax.shard_map`. With them each shard computes, for its own queries only:
- the indexer scores against all keys and the causal top-k, masked at the queries' global
  positions (shard r holds positions r·T_loc ... r·T_loc + T_loc - 1), so the indices are global;
- the sparse MLA over the gathered rows (the kernel dispatch point: Pallas kernels cannot be
  auto-partitioned, so they must run in shard_map, docs/architecture.md §Kernels);
- the sparse indexer KL target and loss.
Gradients are exact: the transpose of the all-gather is a reduce-scatter that returns each shard's
dKV and dk^I to its owner. The gathered keys cost O(L) memory per device, against O(L²/cp)
attention-score compute that is split cp ways. Heads may also be split over `tensor`; the head-mean
KL target is then averaged over `tensor`.
Letters: B batch, T local queries, S = cp·T keys, H heads, C latent dim, J/Dᵢ indexer heads/dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsa_jax import indexer as indexer_lib
from dsa_jax import sharding, sparse_attention


def _names(spec_entry) -> tuple[str, ...]:
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _axis(axes: tuple[str, ...]):
  return axes[0] if len(axes) == 1 else axes


def topk_at_offset(q, k, w, *, offset, topk: int, block_t: int, impl: str, interpret=False):
  """Causal top-k for queries at global positions offset + [0, T) against all S keys.

  Same selection as `indexer.select_topk` when offset = S - T: on GPU with impl="pallas" the
  fused FP8 logits + select kernels (slots in ascending key order), elsewhere lax.top_k per query
  block (score order). -1 pads. q [B,T,J,Dᵢ], k [B,S,Dᵢ], w [B,T,J] -> idx [B,T,topk] int32.
  """
  q, k, w = jax.lax.stop_gradient((q, k, w))
  if impl == "pallas" and (interpret or jax.default_backend() == "gpu"):
    return indexer_lib.select_topk(
      q, k, w, topk=topk, impl=impl, block_t=block_t, offset=offset, interpret=interpret
    )
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  kk = min(topk, s)

  def block(qb, wb, pos):  # pos [tb] global positions of the block's queries
    logits = indexer_lib.indexer_logits(qb, k, wb, impl=impl, causal=False)
    logits = jnp.where(jnp.arange(s)[None, None, :] <= pos[None, :, None], logits, -jnp.inf)
    vals, idx = jax.lax.top_k(logits, kk)
    idx = jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)
    return jnp.pad(idx, ((0, 0), (0, 0), (0, topk - kk)), constant_values=-1)

  pos = offset + jnp.arange(t, dtype=jnp.int32)
  if t <= block_t or t % block_t:
    return block(q, w, pos)
  n = t // block_t
  split = lambda x: jnp.moveaxis(x.reshape((b, n, block_t) + x.shape[2:]), 1, 0)
  out = jax.lax.map(lambda a: block(*a), (split(q), split(w), pos.reshape(n, block_t)))
  return jnp.moveaxis(out, 0, 1).reshape(b, t, topk)


def sparse_attention_cp(ctx: sharding.Context, q_abs, kv_lat, iq, ik, iw, cfg, *, with_kl: bool):
  """DSA attention of one layer on a mesh (sequence, batch and head sharded).

  Args:
    q_abs [B,T,H,C] absorbed queries; kv_lat [B,T,C] latent rows; iq [B,T,J,Dᵢ], ik [B,T,Dᵢ],
    iw [B,T,J] indexer outputs (global shapes; sharded by the context's rules).
  Returns:
    o_lat [B,T,H,kv_lora_rank], lse [B,T,H], kl [B,T] per-query sparse indexer KL (or None).
  """
  q_spec = ctx.spec(("batch", "seq", "act_heads", None), q_abs.shape)
  row_spec = ctx.spec(("batch", "seq", None), kv_lat.shape)
  iq_spec = P(q_spec[0], q_spec[1], None, None)
  iw_spec = P(q_spec[0], q_spec[1], None)
  seq_axes = _names(q_spec[1])
  head_axes = _names(q_spec[2])
  scale, d_v = cfg.softmax_scale, cfg.kv_lora_rank

  def body(q, kv, iq, ik, iw):
    t_loc = q.shape[1]
    if seq_axes:
      kv = jax.lax.all_gather(kv, _axis(seq_axes), axis=1, tiled=True)
      ik = jax.lax.all_gather(ik, _axis(seq_axes), axis=1, tiled=True)
      offset = jax.lax.axis_index(_axis(seq_axes)) * t_loc
    else:
      offset = kv.shape[1] - t_loc
    idx = topk_at_offset(
      iq, ik, iw, offset=offset, topk=cfg.index_topk, block_t=cfg.attn_block_q, impl=cfg.impl
    )
    o, lse = sparse_attention.sparse_mla(q, kv, idx, scale=scale, d_v=d_v, impl=cfg.impl)
    if not with_kl:
      return o, lse, jnp.zeros(q.shape[:2], jnp.float32)
    p = sparse_attention.sparse_probs(q, kv, idx, lse, scale=scale, impl=cfg.impl)
    if head_axes:  # the target is a mean over all heads
      p = jax.lax.pmean(p, _axis(head_axes))
    kl = indexer_lib.sparse_kl(iq, ik, iw, idx, p, impl=cfg.impl)
    return o, lse, kl

  fn = jax.shard_map(
    body,
    mesh=ctx.mesh,
    in_specs=(q_spec, row_spec, iq_spec, row_spec, iw_spec),
    out_specs=(q_spec, P(*q_spec[:3]), P(*q_spec[:2])),
    check_vma=False,
  )
  o, lse, kl = fn(q_abs, kv_lat, iq, ik, iw)
  return o, lse, (kl if with_kl else None)


def warmup_batch_parallel(ctx: sharding.Context, q, k, v, iq, ik, iw, cfg):
  """The warm-up's dense attention and dense indexer KL of one layer on a mesh that splits these
  activations over batch only, inside one `jax.shard_map`, so each device runs the kernels on its
  rows (`sparse_attention.warmup_attention`: the flash attention with its lse on a GPU, splash on
  a TPU; then the dense-KL kernels). Returns None where the sequence or the heads are split (the
  target needs every key and every head of a row; those meshes keep the auto-partitioned XLA
  path).

  Args:
    q [B,T,H,K], k [B,T,H,K], v [B,T,H,V] the MHA-form attention; iq [B,T,J,Dᵢ], ik [B,T,Dᵢ],
    iw [B,T,J] the indexer outputs (global shapes).
  Returns:
    (out [B,T,H,V], kl [B,T]) or None.
  """
  spec = ctx.spec(("batch", "seq", "act_heads", None), q.shape)
  if spec[1] is not None or spec[2] is not None or spec[0] is None:
    return None
  b = spec[0]
  row4, row3, row2 = P(b, None, None, None), P(b, None, None), P(b, None)

  def body(q, k, v, iq, ik, iw):
    o, lse, qt, st = sparse_attention.warmup_attention(
      q, k, v, scale=cfg.softmax_scale, block_t=cfg.attn_block_q, impl=cfg.impl
    )
    kl = indexer_lib.dense_kl(
      iq, ik, iw, qt, k, lse, attn_scale=st, impl=cfg.impl, block_t=cfg.attn_block_q
    )
    return o, kl

  fn = jax.shard_map(
    body,
    mesh=ctx.mesh,
    in_specs=(row4, row4, row4, row4, row3, row3),
    out_specs=(row4, row2),
    check_vma=False,
  )
  return fn(q, k, v, iq, ik, iw)
