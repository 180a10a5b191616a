# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The V4 reference attention ops (pallas_kernels/v4_attention) against naive per-query loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.v4_attention import ops, reference

B, T, H, K, W = 2, 37, 3, 16, 5
SCALE = K**-0.5
# jitted once per static configuration: eager lax.map dispatch is slower than a compile
v4_attention = jax.jit(ops.v4_attention, static_argnames=("scale", "window", "ratio", "block_t"))
sink_attention = jax.jit(ops.sink_attention, static_argnames=("scale", "block_t"))
compressed_topk = jax.jit(ops.compressed_topk, static_argnames=("ratio", "topk", "block_t"))


def _inputs(ratio, seed=0, sink=None):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, T, H, K))
  kv = jax.random.normal(ks[1], (B, T, K))
  ckv = jax.random.normal(ks[2], (B, T // ratio, K)) if ratio else None
  s = jax.random.normal(ks[3], (H,)) if sink is None else jnp.full((H,), sink)
  return q, kv, ckv, s


def _naive(q, kv, sink, *, window, ckv=None, ratio=0, idx=None):
  """Per query: explicit key list (window rows, then visible / selected entries) + the sink."""
  q, kv, sink = np.asarray(q, np.float64), np.asarray(kv, np.float64), np.asarray(sink, np.float64)
  ckv = None if ckv is None else np.asarray(ckv, np.float64)
  idx = None if idx is None else np.asarray(idx)
  out = np.zeros(q.shape)
  lse = np.zeros(q.shape[:3])
  for b in range(q.shape[0]):
    for t in range(q.shape[1]):
      rows = [kv[b, s] for s in range(max(0, t - window + 1), t + 1)]
      if ckv is not None:
        n_vis = (t + 1) // ratio
        ids = range(n_vis) if idx is None else [j for j in idx[b, t] if 0 <= j < n_vis]
        rows += [ckv[b, j] for j in ids]
      rows = np.stack(rows)
      for h in range(q.shape[2]):
        logits = np.append(SCALE * rows @ q[b, t, h], sink[h])
        m = logits.max()
        p = np.exp(logits - m)
        out[b, t, h] = p[:-1] @ rows / p.sum()
        lse[b, t, h] = m + np.log(p.sum())
  return out, lse


@pytest.mark.parametrize("ratio", [0, 4, 8])
def test_dense_over_entries_matches_naive(ratio):
  q, kv, ckv, sink = _inputs(ratio)
  out, lse = v4_attention(q, kv, sink, scale=SCALE, window=W, ckv=ckv, ratio=ratio, block_t=8)
  ref_out, ref_lse = _naive(q, kv, sink, window=W, ckv=ckv, ratio=ratio)
  np.testing.assert_allclose(out, ref_out, atol=2e-5)
  np.testing.assert_allclose(lse, ref_lse, atol=2e-5)


def test_window_only_equals_windowed_causal_softmax():
  """A ratio-0 layer with sink -inf is plain softmax attention under a band mask t-W < s <= t."""
  q, kv, _, sink = _inputs(0, sink=-jnp.inf)
  out, _ = v4_attention(q, kv, sink, scale=SCALE, window=W, block_t=16)
  q, kv = np.asarray(q, np.float64), np.asarray(kv, np.float64)
  logits = np.einsum("bthk,bsk->bhts", q, kv) * SCALE
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  logits = np.where((s <= t) & (s > t - W), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  ref = np.einsum("bhts,bsk->bthk", p / p.sum(-1, keepdims=True), kv)
  np.testing.assert_allclose(out, ref, atol=2e-6)


def test_sink_minus_inf_is_standard_softmax_and_finite_sink_shrinks_the_output():
  q, kv, _, _ = _inputs(0)
  idx = np.tile(np.arange(T)[None, :, None] - np.arange(3)[None, None], (B, 1, 1))  # 3 rows
  base, lse = sink_attention(q, kv, jnp.asarray(idx), jnp.full((H,), -jnp.inf), scale=SCALE)
  rows = np.asarray(kv, np.float64)[np.arange(B)[:, None, None], np.maximum(idx, 0)]
  logits = np.einsum("bthk,btjk->bthj", np.asarray(q, np.float64), rows) * SCALE
  logits = np.where((idx >= 0)[:, :, None], logits, -np.inf)
  mx = logits.max(-1, keepdims=True)
  p = np.exp(logits - mx)
  np.testing.assert_allclose(
    base, np.einsum("bthj,btjk->bthk", p / p.sum(-1, keepdims=True), rows), atol=2e-6
  )
  np.testing.assert_allclose(lse, mx[..., 0] + np.log(p.sum(-1)), atol=2e-6)
  # a finite sink a_h only rescales: out' = out·σ(lse − a_h), lse' = logaddexp(lse, a_h)
  sink = np.array([-1.0, 0.0, 2.0])
  out2, lse2 = sink_attention(q, kv, jnp.asarray(idx), jnp.asarray(sink), scale=SCALE)
  gate = 1 / (1 + np.exp(sink - np.asarray(lse)))
  np.testing.assert_allclose(out2, np.asarray(base) * gate[..., None], atol=2e-6)
  np.testing.assert_allclose(lse2, np.logaddexp(np.asarray(lse), sink), atol=2e-6)


def test_empty_rows_give_zero_output():
  q, kv, _, sink = _inputs(0)
  idx = jnp.full((B, T, 4), -1, jnp.int32).at[:, :, 0].set(T)  # all invalid (-1 or >= S)
  out, lse = sink_attention(q, kv, idx, sink, scale=SCALE)
  np.testing.assert_array_equal(out, 0.0)
  np.testing.assert_allclose(lse, jnp.broadcast_to(sink, lse.shape))
  _, lse_inf = sink_attention(q, kv, idx, jnp.full((H,), -jnp.inf), scale=SCALE)
  assert np.all(np.isposinf(lse_inf))


def test_selected_entries_match_naive_and_topk_covering_all_equals_dense():
  q, kv, ckv, sink = _inputs(4, seed=1)
  kq, kk, kw = jax.random.split(jax.random.key(5), 3)
  iq, ik = jax.random.normal(kq, (B, T, 2, 8)), jax.random.normal(kk, (B, T // 4, 8))
  iw = jax.random.normal(kw, (B, T, 2))
  idx = compressed_topk(iq, ik, iw, ratio=4, topk=3, block_t=8)
  out, lse = v4_attention(q, kv, sink, scale=SCALE, window=W, ckv=ckv, ratio=4, idx=idx)
  ref_out, ref_lse = _naive(q, kv, sink, window=W, ckv=ckv, ratio=4, idx=idx)
  np.testing.assert_allclose(out, ref_out, atol=2e-5)
  np.testing.assert_allclose(lse, ref_lse, atol=2e-5)
  # top-k >= visible entries: CSA is HCA-like dense attention over the entries
  full = compressed_topk(iq, ik, iw, ratio=4, topk=T // 4 + 2)
  out_s, lse_s = v4_attention(q, kv, sink, scale=SCALE, window=W, ckv=ckv, ratio=4, idx=full)
  out_d, lse_d = v4_attention(q, kv, sink, scale=SCALE, window=W, ckv=ckv, ratio=4)
  np.testing.assert_allclose(out_s, out_d, atol=2e-6)
  np.testing.assert_allclose(lse_s, lse_d, atol=2e-6)


def test_structured_op_equals_one_index_buffer():
  """window ∪ (T + selected entry) over [raw rows | entries]: the kernels' index-buffer contract."""
  q, kv, ckv, sink = _inputs(4, seed=2)
  idx = jnp.asarray(np.random.default_rng(0).integers(-1, T // 4, (B, T, 4)), jnp.int32)
  idx = jnp.where(idx < ((jnp.arange(T) + 1) // 4)[None, :, None], idx, -1)  # visible only
  win = jnp.broadcast_to(reference.window_indices(T, W)[None], (B, T, W))
  buf = jnp.concatenate([win, jnp.where(idx >= 0, T + idx, -1)], axis=-1)
  rows = jnp.concatenate([kv, ckv], axis=1)
  a = v4_attention(q, kv, sink, scale=SCALE, window=W, ckv=ckv, ratio=4, idx=idx, block_t=8)
  b = sink_attention(q, rows, buf, sink, scale=SCALE, block_t=16)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, atol=2e-6)


def test_block_causal_no_partial_block():
  """Entry j reaches query t iff j < (t+1)//m: the last token of block j is the first to see it."""
  m = 8
  q, kv, ckv, sink = _inputs(m, seed=3)
  f = lambda c: v4_attention(q, kv, sink, scale=SCALE, window=W, ckv=c, ratio=m, block_t=8)[0]
  j = 2
  diff = np.abs(np.asarray(f(ckv.at[:, j].add(3.0)) - f(ckv))).max(axis=(0, 2, 3))  # [T]
  first = (j + 1) * m - 1
  assert np.all(diff[:first] == 0) and np.all(diff[first:] > 0)


def test_compressed_topk_matches_naive_selection():
  kq, kk, kw = jax.random.split(jax.random.key(7), 3)
  iq, ik = jax.random.normal(kq, (B, T, 2, 8)), jax.random.normal(kk, (B, T // 4, 8))
  iw = jax.random.normal(kw, (B, T, 2))
  topk = 3
  idx = np.asarray(compressed_topk(iq, ik, iw, ratio=4, topk=topk, block_t=8))
  logits = np.asarray(reference.compressed_indexer_logits(iq, ik, iw, 4))
  for b in range(B):
    for t in range(T):
      n = (t + 1) // 4
      order = np.argsort(-logits[b, t, :n], kind="stable")[:topk]  # ties to the lower id
      want = np.concatenate([order, -np.ones(topk - len(order), int)])
      np.testing.assert_array_equal(idx[b, t], want)


def test_impl_switch_and_shape_errors():
  q, kv, ckv, sink = _inputs(4)
  with pytest.raises(ValueError, match="impl"):
    ops.v4_attention(q, kv, sink, scale=SCALE, window=W, impl="triton")
  with pytest.raises(ValueError, match="sink"):
    ops.v4_attention(q, kv, sink[:2], scale=SCALE, window=W)
  with pytest.raises(ValueError, match="ratio"):
    ops.v4_attention(q, kv, sink, scale=SCALE, window=W, ckv=ckv)
