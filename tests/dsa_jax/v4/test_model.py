# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The V4 model (v4_test: window, CSA and HCA layers, a hash layer, MTP): shapes, causality,
dense = sparse when top-k covers every entry. One compile per (config, mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsa_jax.v4 import attention, config, model

T = 40  # CSA: 10 entries (top-k 4 binds); HCA (m = 16): 2 entries; window 8


@pytest.fixture(scope="module")
def runs():
  cfg = config.preset("v4_test")
  m = model.build(cfg, seed=0)
  # MTP runs in the sparse compile only (one model compile per mode keeps the file fast)
  fwd = {
    mode: nnx.jit(lambda m, t, mode=mode: m(t, attention=mode, mtp=mode == "sparse"))
    for mode in ("dense", "sparse")
  }
  tokens = jax.random.randint(jax.random.key(0), (2, T), 0, cfg.vocab_size)
  return cfg, m, fwd, tokens


def test_shapes_and_layer_types(runs):
  cfg, m, fwd, tokens = runs
  assert [cfg.layer_kind(i) for i in range(cfg.n_layers + 1)] == ["window", "csa", "hca", "window"]
  logits, aux = fwd["sparse"](m, tokens)
  assert logits.shape == aux["mtp_logits"].shape == (2, T, cfg.vocab_size)
  assert aux["moe_load"].shape == (cfg.n_layers, cfg.n_routed_experts)
  assert set(aux["topk_idx"]) == {1} and aux["topk_idx"][1].shape == (2, T, cfg.index_topk)
  assert np.all(np.isfinite(np.asarray(logits)))
  idx = np.asarray(aux["topk_idx"][1])
  n_vis = (np.arange(T) + 1) // 4
  assert np.all(idx < n_vis[None, :, None])  # block-causal selection, -1 beyond
  want = np.broadcast_to(np.minimum(n_vis, cfg.index_topk), (2, T))
  np.testing.assert_array_equal((idx >= 0).sum(-1), want)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_future_tokens_never_change_past_outputs(runs, mode):
  cfg, m, fwd, tokens = runs
  p = 23  # inside CSA block 5 and HCA block 1: both partial for the queries before it
  changed = tokens.at[:, p].set((tokens[:, p] + 1) % cfg.vocab_size)
  a, aux_a = fwd[mode](m, tokens)
  b, aux_b = fwd[mode](m, changed)
  np.testing.assert_array_equal(a[:, :p], b[:, :p])
  assert np.abs(np.asarray(a[:, p:] - b[:, p:])).max() > 0
  if "mtp_logits" in aux_a:  # MTP at t reads token t+1
    np.testing.assert_array_equal(aux_a["mtp_logits"][:, : p - 1], aux_b["mtp_logits"][:, : p - 1])


def test_sparse_equals_dense_when_topk_covers_every_entry(runs):
  """A CSA layer whose top-k covers every visible entry is dense attention over the entries."""
  cfg = runs[0].replace(index_topk=T // 4 + 3, indexer_quant="none", attn_block_q=64)
  layer = attention.V4Attention(cfg, 4, rngs=nnx.Rngs(0))
  layer.attn_sink[...] = jnp.linspace(-1.0, 1.0, cfg.n_heads)
  x = jax.random.normal(jax.random.key(1), (2, T, cfg.dim))
  run = nnx.jit(lambda layer, x, mode: layer(x, attention=mode)[0], static_argnums=2)
  dense, sparse = run(layer, x, "dense"), run(layer, x, "sparse")
  np.testing.assert_allclose(sparse, dense, atol=1e-5, rtol=1e-5)
  _, m, fwd, tokens = runs  # in the model, top-k 4 < 10 entries: sparse differs from dense
  assert np.abs(np.asarray(fwd["sparse"](m, tokens)[0] - fwd["dense"](m, tokens)[0])).max() > 1e-4


def test_unknown_mode_is_an_error(runs):
  _, m, _, tokens = runs
  with pytest.raises(ValueError, match="attention"):
    m(tokens, attention="dense_mqa")


def test_hidden_is_the_heads_input(runs):
  """hidden=True returns what the output head reads (and mtp_hidden for MTP): head(x) is the
  logits (the chunked loss, losses.*_from_hidden, relies on it)."""
  cfg, m, fwd, tokens = runs
  logits, aux = fwd["sparse"](m, tokens)
  x, haux = nnx.jit(lambda m, t: m(t, attention="sparse", mtp=True, hidden=True))(m, tokens)
  assert x.shape == (2, T, cfg.dim) and "mtp_logits" not in haux
  np.testing.assert_allclose(m.head(x).astype(jnp.float32), logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    m.head(haux["mtp_hidden"]).astype(jnp.float32), aux["mtp_logits"], rtol=1e-5, atol=1e-5
  )
