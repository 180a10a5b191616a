# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsa_jax
from dsa_jax import generate, mla, model, moe, train

T = 48  # > index_topk=16 of the test preset, so DSA is really sparse past position 15


@functools.lru_cache(maxsize=None)
def _model(**kw):
  cfg = dsa_jax.preset("test", **kw)
  m = model.build(cfg, seed=0)
  graphdef, state = nnx.split(m)

  @functools.partial(jax.jit, static_argnames=("attention", "indexer_loss", "metrics", "mtp"))
  def fwd(state, tokens, attention="dense", indexer_loss="none", metrics=False, mtp=False):
    return nnx.merge(graphdef, state)(
      tokens, attention=attention, indexer_loss=indexer_loss, metrics=metrics, mtp=mtp
    )

  return cfg, state, fwd


def _tokens(seed, b=2, t=T):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 256)


def test_shapes_and_dtypes():
  cfg, state, fwd = _model()
  logits, aux = fwd(state, _tokens(0), attention="sparse", indexer_loss="sparse", mtp=True)
  assert logits.shape == (2, T, cfg.vocab_size) and logits.dtype == jnp.float32
  assert aux["indexer_kl"].shape == (cfg.n_layers,)
  assert aux["moe_load"].shape == (cfg.n_moe_layers, cfg.n_routed_experts)
  assert aux["mtp_logits"].shape == logits.shape
  # each MoE layer routes every token to exactly n_activated experts
  np.testing.assert_array_equal(aux["moe_load"].sum(-1), 2 * T * cfg.n_activated_experts)
  assert bool(jnp.all(jnp.isfinite(logits))) and bool(jnp.all(aux["indexer_kl"] >= 0))


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_causality(attention):
  _, state, fwd = _model()
  tok = _tokens(1)
  t0 = 30
  tok2 = tok.at[:, t0 + 1 :].set((tok[:, t0 + 1 :] + 7) % 256)
  a, _ = fwd(state, tok, attention=attention)
  b, _ = fwd(state, tok2, attention=attention)
  np.testing.assert_allclose(a[:, : t0 + 1], b[:, : t0 + 1], rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(a[:, t0 + 1 :] - b[:, t0 + 1 :]).max()) > 1e-3


def test_one_registry_of_modes():
  bad = [
    dict(attention="x"),
    dict(indexer_loss="y"),
    dict(attention="dense", indexer_loss="sparse"),
  ]
  for kw in bad:
    with pytest.raises(ValueError):
      mla.check_modes(**{"attention": "sparse", "indexer_loss": "none", **kw})
    with pytest.raises(ValueError, match="PhaseConfig"):
      train.PhaseConfig(**kw)
  assert set(generate.ATTENTION) <= set(mla.ATTENTION_MODES)


def test_sparse_differs_from_dense_when_topk_below_length():
  _, state, fwd = _model()
  tok = _tokens(2)
  a, _ = fwd(state, tok, attention="dense")
  b, _ = fwd(state, tok, attention="sparse")
  # positions < index_topk see every key: identical; later ones attend to a strict subset
  np.testing.assert_allclose(a[:, :16], b[:, :16], rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(a[:, 16:] - b[:, 16:]).max()) > 1e-4


def test_sparse_equals_dense_when_topk_covers_sequence():
  _, state, fwd = _model(index_topk=64)
  tok = _tokens(3)
  a, _ = fwd(state, tok, attention="dense")
  b, _ = fwd(state, tok, attention="sparse")
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_absorbed_mqa_equals_mha():
  _, state, fwd = _model()
  tok = _tokens(4)
  a, _ = fwd(state, tok, attention="dense")
  b, _ = fwd(state, tok, attention="dense_mqa")
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fp8_indexer_selection_close_to_plain():
  cfg = dsa_jax.preset("test")
  m = model.build(cfg)
  x = jax.random.normal(jax.random.key(0), (1, 64, cfg.dim))
  qr = jax.random.normal(jax.random.key(1), (1, 64, cfg.q_lora_rank))
  from dsa_jax import indexer, layers

  cos, sin = layers.rope_angles(cfg, jnp.arange(64)[None])
  idx = m.dense_layers.attn.indexer
  one = nnx.merge(*nnx.split(idx))  # stacked: take layer 0
  one_state = jax.tree.map(lambda v: v[0], nnx.state(one))
  gd = nnx.graphdef(one)
  sel = {}
  for mode in ("fp8", "float32"):
    mod = nnx.merge(gd, one_state)
    mod.cfg = cfg.replace(indexer_dtype=mode)
    q, k, w = mod(x, qr, cos, sin)
    sel[mode] = indexer.select_topk(q, k, w, topk=16, impl="reference", block_t=32)
  a, b = np.asarray(sel["fp8"]), np.asarray(sel["float32"])
  overlap = np.mean([len(set(a[0, t]) & set(b[0, t])) / 16 for t in range(16, 64)])
  assert overlap > 0.8, overlap


def test_moe_group_limit_and_bias_only_in_selection():
  cfg = dsa_jax.preset("test")  # 8 experts, 4 groups of 2, keep 2 groups, top-2 experts
  scores = jnp.array([[0.9, 0.1, 0.2, 0.2, 0.85, 0.8, 0.3, 0.3]])
  ids, w = moe.route(scores, jnp.zeros(8), cfg)
  # group sums: g0=1.0, g1=0.4, g2=1.65, g3=0.6 -> keep g2, g0 -> experts {0, 4}
  assert set(np.asarray(ids[0]).tolist()) == {0, 4}
  np.testing.assert_allclose(jnp.sum(w), cfg.route_scale, rtol=1e-6)
  # a bias lifts group 1 and expert 3 into the selection ...
  bias = jnp.array([0, 0, 0, 1.0, 0, 0, 0, 0])
  ids_b, w_b = moe.route(scores, bias, cfg)
  assert 3 in np.asarray(ids_b[0]).tolist()
  # ... but the combine weights use the unbiased scores
  chosen = np.asarray(ids_b[0])
  expect = np.asarray(scores[0])[chosen] / np.asarray(scores[0])[chosen].sum() * cfg.route_scale
  np.testing.assert_allclose(np.asarray(w_b[0]), expect, rtol=1e-6)
  # experts outside the kept groups are never chosen, whatever their score
  s2 = jnp.array([[0.99, 0.0, 0.98, 0.97, 0.96, 0.0, 0.5, 0.5]])
  ids2, _ = moe.route(s2, jnp.zeros(8), cfg)  # g0=.99 g1=1.95 g2=.96 g3=1.0 -> g1, g3
  assert set(np.asarray(ids2[0]).tolist()) <= {2, 3, 6, 7}


def test_router_bias_balancing_rule():
  bias = jnp.zeros(4)
  load = jnp.array([10.0, 0.0, 5.0, 5.0])
  np.testing.assert_allclose(moe.update_router_bias(bias, load, 0.1), [-0.1, 0.1, 0.0, 0.0])


def test_v32_671b_parameter_counts_abstract():
  m = model.abstract(dsa_jax.preset("v32_671b"))
  leaves = jax.tree.leaves(nnx.state(m))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  total = model.param_count(m)
  mtp = model.param_count(m.mtp)
  main = total - mtp
  embed = 129280 * 7168
  assert main == 671_877_944_064  # docs/dsa.md §Invariants: V3.2 main model
  assert mtp == 11_624_027_648  # MTP unique params
  assert mtp + 2 * embed == 13_477_385_728  # MTP as stored (own copies of embed and head)
  assert main + mtp + 2 * embed == 685_355_329_792  # total stored
  indexer = model.param_count(m.dense_layers.attn.indexer) + model.param_count(
    m.moe_layers.attn.indexer
  )
  assert indexer == 61 * 13_959_424 == 851_524_864


def _big_shapes(mx):
  out = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        shape = getattr(v.aval, "shape", ())
        if sum(d >= mx for d in shape) >= 2:
          out.append((str(eqn.primitive), shape))
      for p in eqn.params.values():
        for sub in p if isinstance(p, (list, tuple)) else [p]:
          if hasattr(sub, "jaxpr"):
            walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
          elif hasattr(sub, "eqns"):
            walk(sub)

  return out, walk


@pytest.mark.parametrize(
  "attention,indexer_loss,metrics",
  [("dense", "dense", False), ("sparse", "sparse", False), ("dense", "none", True)],
)
def test_no_LxL_array_at_long_context(attention, indexer_loss, metrics):
  """Trace (no compile, nothing allocated) forward+backward at L=8192: no [L, L]-sized value."""
  L = 8192
  cfg = dsa_jax.preset("test", max_seq_len=L, attn_block_q=512, index_topk=256)
  abs_m = model.abstract(cfg)
  gd, st = nnx.split(abs_m)
  tok = jax.ShapeDtypeStruct((1, L), jnp.int32)

  def loss(st, tok):
    logits, aux = nnx.merge(gd, st)(
      tok, attention=attention, indexer_loss=indexer_loss, metrics=metrics
    )
    return jnp.mean(logits) + sum(jnp.sum(v) for k, v in aux.items() if k != "moe_load")

  jaxpr = jax.make_jaxpr(jax.grad(loss))(st, tok)
  found, walk = _big_shapes(L // 2)
  walk(jaxpr.jaxpr)
  assert not found, found[:5]
