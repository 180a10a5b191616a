# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""DeepSeek-V4 attention in pure JAX: window ∪ compressed rows, one softmax with a per-head sink.

The definition every V4 kernel is tested against (docs/v4.md §Attention). K = V: one row of K
values per key serves as key and value for all heads (MQA). The sink a_h is a logit with no value:
it adds exp(a_h) to the denominator only, so the sink-inclusive lse is
`log(exp(a_h) + Σ_keys exp(scale·q·row))` and `out = Σ_keys exp(logit − lse)·row`.

Visibility (queries are positions 0..T-1 of the same sequence as the raw rows):
- window: raw row s is visible to query t iff t − W < s ≤ t (W = window, the query included);
- compressed entry j of ratio m is visible iff j < (t+1)//m: only complete blocks, never a partial
  one (entry j pools tokens up to (j+1)·m − 1).

Everything is chunked over query blocks: a block holds [tb, tb+W−1] window logits and [tb, U]
(dense over entries) or [tb, k] (selected entries) compressed logits, never [T, T] or [T, U].

Letters: B batch, T queries, S raw rows, U compressed entries, H heads, K row dim, W window band,
k selected slots, J/Dᵢ indexer heads/dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels.topk.reference import topk_reference


def visible_entries(t, ratio: int):
  """Number of compressed entries query position t may see: (t+1)//m (block-causal)."""
  return (t + 1) // ratio


def _combine(parts, sink):
  """Joint softmax over several key sets plus the sink.

  parts: [(logits [B,t,H,n] f32 with -inf masked, rows [B,t?,n,K] or [B,n,K] einsum-ready fn)].
  Returns out [B,t,H,K] f32 and lse [B,t,H] f32 (+inf for a row with no key and a -inf sink).
  """
  mx = sink[None, None, :]
  for logits, _ in parts:
    mx = jnp.maximum(mx, jnp.max(logits, axis=-1))
  safe = jnp.where(jnp.isfinite(mx), mx, 0.0)
  den = jnp.exp(sink[None, None, :] - safe)
  out = 0.0
  for logits, apply_rows in parts:
    p = jnp.exp(logits - safe[..., None])
    den = den + jnp.sum(p, axis=-1)
    out = out + apply_rows(p)
  empty = den == 0
  den_safe = jnp.where(empty, 1.0, den)
  out = jnp.where(empty[..., None], 0.0, out / den_safe[..., None])
  lse = jnp.where(empty, jnp.inf, safe + jnp.log(den_safe))
  return out, lse


def sink_attention(q, kv, idx, sink, *, scale: float, block_t: int = 512):
  """Attention over an explicit index buffer of rows with the sink folded into the softmax.

  q [B,T,H,K], kv [B,S,K] (K = V), idx [B,T,k] int (<0 or >=S: no key; duplicates count twice),
  sink [H] f32 -> out [B,T,H,K] (q.dtype), lse [B,T,H] f32 (sink-inclusive).
  """
  s = kv.shape[1]
  sink = sink.astype(jnp.float32)

  def block(qb, ib):
    valid = (ib >= 0) & (ib < s)
    rows = jnp.take_along_axis(kv[:, None], jnp.clip(ib, 0, s - 1)[..., None], axis=2)  # [B,t,k,K]
    logits = jnp.einsum("bthk,btjk->bthj", qb, rows, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(valid[:, :, None], logits, -jnp.inf)
    apply = lambda p: jnp.einsum("bthj,btjk->bthk", p, rows.astype(jnp.float32))
    out, lse = _combine([(logits, apply)], sink)
    return out.astype(q.dtype), lse

  return _common.map_query_blocks(block, block_t, [q, idx])


def v4_attention(
  q, kv, sink, *, scale: float, window: int, ckv=None, ratio: int = 0, idx=None, block_t=512
):
  """Window ∪ compressed attention of one V4 layer, queries = positions 0..T-1 of kv.

  q [B,T,H,K], kv [B,T,K] raw rows, sink [H];
  ckv [B,U,K] compressed entries of ratio `ratio` (None: window only, a ratio-0 layer);
  idx [B,T,k] selected entry ids (CSA; -1 = none), or None: every visible entry (HCA, and CSA's
  dense stage). Entries with j >= (t+1)//m are never attended, whatever idx holds.
  Returns out [B,T,H,K] (q.dtype), lse [B,T,H] f32 (sink-inclusive).
  """
  b, t = q.shape[:2]
  if kv.shape[1] != t:
    raise ValueError(f"v4_attention wants the raw rows of the T={t} queries, got {kv.shape}")
  if window <= 0:
    raise ValueError(f"window={window} must be > 0")
  if ckv is not None and ratio <= 0:
    raise ValueError(f"compressed rows need a ratio > 0, got {ratio}")
  sink = sink.astype(jnp.float32)
  tb = min(block_t, t)
  n_blocks = -(-t // tb)
  band = tb + window - 1
  # W-1 leading zero rows so query block [t0, t0+tb) reads its band at offset t0; trailing rows
  # so the padded last block stays in range.
  kv_pad = jnp.pad(kv, ((0, 0), (window - 1, n_blocks * tb - t), (0, 0)))
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))

  def block(qb, pb, *rest):
    t0 = pb[0, 0]
    tq = pb[:, :, None]  # [B,t,1] query positions
    rows = jax.lax.dynamic_slice_in_dim(kv_pad, t0, band, axis=1)  # [B,W',K]
    rpos = t0 - (window - 1) + jnp.arange(band)[None, None, :]  # absolute raw positions
    lw = jnp.einsum("bthk,bsk->bths", qb, rows, preferred_element_type=jnp.float32) * scale
    ok = (rpos >= 0) & (rpos <= tq) & (rpos > tq - window)
    lw = jnp.where(ok[:, :, None], lw, -jnp.inf)
    parts = [(lw, lambda p: jnp.einsum("bths,bsk->bthk", p, rows.astype(jnp.float32)))]
    if ckv is not None and ckv.shape[1]:
      u = ckv.shape[1]
      n_vis = visible_entries(tq, ratio)  # [B,t,1]
      if idx is None:
        lc = jnp.einsum("bthk,buk->bthu", qb, ckv, preferred_element_type=jnp.float32) * scale
        okc = jnp.arange(u)[None, None, :] < n_vis
        lc = jnp.where(okc[:, :, None], lc, -jnp.inf)
        parts.append((lc, lambda p: jnp.einsum("bthu,buk->bthk", p, ckv.astype(jnp.float32))))
      else:
        (ib,) = rest
        okc = (ib >= 0) & (ib < jnp.minimum(n_vis, u))
        sel = jnp.take_along_axis(ckv[:, None], jnp.clip(ib, 0, u - 1)[..., None], axis=2)
        lc = jnp.einsum("bthk,btjk->bthj", qb, sel, preferred_element_type=jnp.float32) * scale
        lc = jnp.where(okc[:, :, None], lc, -jnp.inf)
        parts.append((lc, lambda p: jnp.einsum("bthj,btjk->bthk", p, sel.astype(jnp.float32))))
    out, lse = _combine(parts, sink)
    return out.astype(q.dtype), lse

  xs = [q, pos] + ([idx] if (ckv is not None and ckv.shape[1] and idx is not None) else [])
  return _common.map_query_blocks(block, tb, xs)


def window_indices(t: int, window: int):
  """[T, W] raw row ids of each query's window, oldest first, -1 before position 0."""
  base = jnp.arange(t)[:, None] - (window - 1) + jnp.arange(window)[None, :]
  return jnp.where(base >= 0, base, -1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Indexer over compressed keys (CSA): logits and the block-causal top-k.


def compressed_indexer_logits(q, k, w, ratio: int):
  """I[t,j] = Σ_j' w[t,j']·ReLU(q[t,j']·k[j]), -inf where j >= (t+1)//m.

  q [B,T,J,Dᵢ], k [B,U,Dᵢ], w [B,T,J] (all positive scales folded in) -> [B,T,U] f32.
  For query blocks / small shapes: the full [T,U] array.
  """
  t, u = q.shape[1], k.shape[1]
  s = jnp.einsum("btjd,bud->btju", q, k, preferred_element_type=jnp.float32)
  logits = jnp.einsum("btju,btj->btu", jax.nn.relu(s), w.astype(jnp.float32))
  n_vis = visible_entries(jnp.arange(t), ratio)[:, None]
  return jnp.where(jnp.arange(u)[None, :] < n_vis, logits, -jnp.inf)


def compressed_indexer_topk(q, k, w, *, ratio: int, topk: int, block_t: int = 512):
  """Top-k compressed entries per query: idx [B,T,topk] int32, -1 padded, ties to the lower id.

  Row t selects min(topk, (t+1)//m) entries among the visible ones (docs/v4.md §Indexer).
  """
  b, t = q.shape[:2]
  if k.shape[1] == 0:  # T < m: nothing is visible yet
    return jnp.full((b, t, topk), -1, jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))

  def block(qb, wb, pb):
    s = jnp.einsum("btjd,bud->btju", qb, k, preferred_element_type=jnp.float32)
    logits = jnp.einsum("btju,btj->btu", jax.nn.relu(s), wb.astype(jnp.float32))
    ok = jnp.arange(k.shape[1])[None, None, :] < visible_entries(pb, ratio)[..., None]
    return topk_reference(jnp.where(ok, logits, -jnp.inf), topk)

  return jax.lax.stop_gradient(_common.map_query_blocks(block, block_t, [q, w, pos], remat=False))


# ----------------------------------------------------------------------------------------------
# Indexer KL of CSA layers (the warm-up and sparse training stages, docs/v4.md §Training).


def _indexer_scores(q, k, w):
  """q [B,t,J,Dᵢ], k [B,t?,n,Dᵢ] (per query) or [B,n,Dᵢ] (shared) -> I [B,t,n] f32."""
  eq = "btjd,btnd->btjn" if k.ndim == 4 else "btjd,bnd->btjn"
  s = jnp.einsum(eq, q, k, preferred_element_type=jnp.float32)
  return jnp.einsum("btjn,btj->btn", jax.nn.relu(s), w.astype(jnp.float32))


def _kl_rows(teacher_logits, lse, scores, ok):
  """KL(p ‖ softmax(scores)) per query over the support `ok` [B,t,n].

  teacher_logits [B,t,H,n] f32, lse [B,t,H] (the layer's sink-inclusive lse):
  p = Σ_h exp(logit − lse) on the support, L1-normalised there. Rows with an empty support (or
  no teacher mass) give 0 with zero gradients.
  """
  pt = jnp.sum(jnp.exp(teacher_logits - lse[..., None]), axis=2)  # [B,t,n]
  pt = jnp.where(ok, pt, 0.0)
  mass = jnp.sum(pt, axis=-1, keepdims=True)
  live = mass > 0
  p = pt / jnp.where(live, mass, 1.0)
  s = jnp.where(ok, scores, -1e30)  # finite: an all-masked row must not make NaN gradients
  log_q = s - jax.nn.logsumexp(s, axis=-1, keepdims=True)
  plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
  kl = jnp.sum(plogp - jnp.where(ok, p * log_q, 0.0), axis=-1)
  return jnp.where(live[..., 0], kl, 0.0)


def v4_indexer_kl(
  iq, ik, iw, q, ckv, lse, *, ratio: int, scale: float, idx=None, block_t: int = 512
):
  """Per-query KL [B,T] of the indexer against the layer's head-summed attention (CSA layers).

  iq [B,T,J,Dᵢ], ik [B,U,Dᵢ], iw [B,T,J] (the indexer's q, compressed keys, weights);
  q [B,T,H,K], ckv [B,U,K] (the attention's queries and compressed rows), lse [B,T,H] (the
  attention's sink-inclusive lse over window ∪ its compressed rows ∪ sink);
  idx [B,T,k] (sparse stage: the support S_t is the valid selected entries) or None (warm-up:
  every visible entry j < (t+1)//m).
  The teacher p_t = Σ_h exp(scale·q_h·c_j − lse_h) on S_t, L1-normalised over S_t (the joint
  softmax's mass on the compressed entries, window and sink excluded from the support); the
  student is softmax_{S_t}(I_t). Gradients reach iq, ik, iw only (the teacher is detached).
  """
  q, ckv, lse = jax.lax.stop_gradient((q, ckv, lse))
  b, t = q.shape[:2]
  u = ckv.shape[1]
  if u == 0:
    return jnp.zeros((b, t), jnp.float32)
  lse = lse.astype(jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))

  def block(qb, iqb, iwb, lb, pb, *rest):
    n_vis = jnp.minimum(visible_entries(pb, ratio), u)[..., None]  # [B,t,1]
    if idx is None:
      ok = jnp.arange(u)[None, None, :] < n_vis
      c = jnp.einsum("bthk,buk->bthu", qb, ckv, preferred_element_type=jnp.float32)
      scores = _indexer_scores(iqb, ik, iwb)
    else:
      (ib,) = rest
      ok = (ib >= 0) & (ib < n_vis)
      safe = jnp.clip(ib, 0, u - 1)[..., None]
      sel = jnp.take_along_axis(ckv[:, None], safe, axis=2)  # [B,t,k,K]
      c = jnp.einsum("bthk,btjk->bthj", qb, sel, preferred_element_type=jnp.float32)
      scores = _indexer_scores(iqb, jnp.take_along_axis(ik[:, None], safe, axis=2), iwb)
    return _kl_rows(c * scale, lb, scores, ok)

  xs = [q, iq, iw, lse, pos] + ([] if idx is None else [idx])
  return _common.map_query_blocks(block, block_t, xs)


def v4_teacher_recall(q, ckv, lse, idx, *, ratio: int, scale: float, block_t: int = 512):
  """Eval metrics of a CSA layer's selection against its dense teacher, per query [B,T] each:
  recall = the teacher's compressed mass (over every visible entry, L1-normalised) inside idx;
  overlap = |idx ∩ the teacher's top-k| / |valid idx| (1 where nothing is visible).
  lse is the dense attention's (window ∪ every visible entry ∪ sink)."""
  b, t = q.shape[:2]
  u, kk = ckv.shape[1], idx.shape[-1]
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))

  def block(qb, lb, pb, ib):
    n_vis = jnp.minimum(visible_entries(pb, ratio), u)[..., None]
    ok = jnp.arange(u)[None, None, :] < n_vis
    c = jnp.einsum("bthk,buk->bthu", qb, ckv, preferred_element_type=jnp.float32) * scale
    pt = jnp.where(ok, jnp.sum(jnp.exp(c - lb[..., None]), axis=2), 0.0)
    p = pt / jnp.maximum(jnp.sum(pt, axis=-1, keepdims=True), 1e-30)
    valid = (ib >= 0) & (ib < n_vis)
    hit = jnp.take_along_axis(p, jnp.clip(ib, 0, u - 1), axis=-1)
    recall = jnp.where(n_vis[..., 0] > 0, jnp.sum(jnp.where(valid, hit, 0.0), axis=-1), 1.0)
    best = topk_reference(jnp.where(ok, p, -jnp.inf), kk)  # -1 padded
    same = (ib[..., :, None] == best[..., None, :]) & (best[..., None, :] >= 0)
    n_ok = jnp.sum(valid, axis=-1)
    inter = jnp.sum(jnp.any(same, axis=-1) & valid, axis=-1)
    overlap = jnp.where(n_ok > 0, inter / jnp.maximum(n_ok, 1), 1.0)
    return recall, overlap.astype(jnp.float32)

  if u == 0:
    one = jnp.ones((b, t), jnp.float32)
    return one, one
  q, ckv, lse = jax.lax.stop_gradient((q, ckv, lse.astype(jnp.float32)))
  return _common.map_query_blocks(block, block_t, [q, lse, pos, idx], remat=False)
