# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""V4 building blocks: compressor pooling, RoPE, fake quant, Sinkhorn, routing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsa_jax.v4 import compressor, config, hyper, moe, quant, rope


def _naive_pool(kv, score, ape, m):
  """Entry j, channel c: softmax over its pooled rows of (score + ape[slot]), loops only."""
  kv, score, ape = (np.asarray(a, np.float64) for a in (kv, score, ape))
  b, t, ck = kv.shape
  k = ck // 2 if m == 4 else ck
  out = np.zeros((b, t // m, k))
  for bi in range(b):
    for j in range(t // m):
      for c in range(k):
        rows = []  # (value, gate logit)
        if m == 4:
          for r in range(m):  # first halves of the previous block (none for j = 0)
            if j > 0:
              s = 4 * (j - 1) + r
              rows.append((kv[bi, s, c], score[bi, s, c] + ape[r, c]))
          for r in range(m):  # second halves of block j
            s = 4 * j + r
            rows.append((kv[bi, s, k + c], score[bi, s, k + c] + ape[r, k + c]))
        else:
          for r in range(m):
            s = m * j + r
            rows.append((kv[bi, s, c], score[bi, s, c] + ape[r, c]))
        v, g = np.array(rows).T
        p = np.exp(g - g.max())
        out[bi, j, c] = p @ v / p.sum()
  return out


@pytest.mark.parametrize("m,c", [(4, 2), (8, 1)])
def test_pool_matches_naive_loop(m, c):
  ks = jax.random.split(jax.random.key(m), 3)
  t, k = 4 * m + 3, 5  # a trailing partial block that must be dropped
  kv = jax.random.normal(ks[0], (2, t, c * k))
  score = jax.random.normal(ks[1], (2, t, c * k))
  ape = jax.random.normal(ks[2], (m, c * k))
  out = jax.jit(compressor.pool, static_argnums=3)(kv, score, ape, m)
  assert out.shape == (2, t // m, k)
  np.testing.assert_allclose(out, _naive_pool(kv, score, ape, m), atol=1e-5)


def test_compressor_entry_j_reads_only_tokens_before_the_end_of_its_block():
  cfg = config.preset("v4_test", kv_quant="none")
  comp = compressor.Compressor(cfg, 4, 16, "kv_latent", rngs=nnx.Rngs(0))
  comp.ape[...] = jax.random.normal(jax.random.key(1), comp.ape[...].shape)
  x = jax.random.normal(jax.random.key(2), (1, 24, cfg.dim))
  run = nnx.jit(lambda comp, x: comp(x))
  base = run(comp, x)
  for p in (5, 11, 23):
    d = np.abs(np.asarray(run(comp, x.at[:, p].add(1.0)) - base)).max(axis=(0, 2))
    # token p is in block p//4: entry p//4 (second halves) and p//4 + 1 (first halves) change
    assert np.all(d[: p // 4] == 0) and d[p // 4] > 0, (p, d)
    if p // 4 + 1 < len(d):
      assert d[p // 4 + 1] > 0 and np.all(d[p // 4 + 2 :] == 0)


def test_rope_tail_inverse_and_relative_position():
  cfg = config.preset("v4_test")
  x = jax.random.normal(jax.random.key(0), (1, 6, 2, cfg.head_dim))
  cos, sin = rope.angles(cfg, jnp.arange(6), compressed=True)
  y = rope.rope_tail(x, cos, sin)
  np.testing.assert_array_equal(y[..., : cfg.nope_dim], x[..., : cfg.nope_dim])
  np.testing.assert_allclose(rope.rope_tail(y, cos, sin, inverse=True), x, atol=1e-6)
  # q(t)·k(s) after rope depends on t - s only
  q, k = x[:, :1, :1], x[:, 1:2, :1]
  dots = [
    jnp.sum(
      rope.rope_tail(q, cos[a : a + 1], sin[a : a + 1])
      * rope.rope_tail(k, cos[b : b + 1], sin[b : b + 1])
    )
    for a, b in ((3, 1), (5, 3))
  ]
  np.testing.assert_allclose(dots[0], dots[1], rtol=1e-5)


def test_yarn_range_of_the_compressed_layers():
  """dim 64, θ 160000, original length 65536: pairs <= 15 kept, >= 25 divided by 16."""
  cfg = config.preset("v4_flash")
  assert rope.yarn_range(cfg) == (15, 25)
  plain = 1.0 / 160000.0 ** (np.arange(0, 64, 2) / 64)
  f = rope.inv_freq(cfg, True)
  np.testing.assert_allclose(f[:16], plain[:16])
  np.testing.assert_allclose(f[25:], plain[25:] / 16)
  np.testing.assert_allclose(rope.inv_freq(cfg, False), 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64))


def test_fake_quant_grids_and_straight_through_gradient():
  x = jax.random.normal(jax.random.key(0), (3, 70)) * 3
  y4 = jax.jit(quant.fp4_fake_quant)(x)
  for blk in range(0, 70, 32):  # every value is a power-of-two scale times an e2m1 value
    v = y4[:, blk : blk + 32]
    s = 2.0 ** np.ceil(np.log2(np.max(np.abs(x[:, blk : blk + 32]), axis=1, keepdims=True) / 6))
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert np.all(np.isin(np.abs(np.asarray(v) / s), grid))
  y8 = jax.jit(quant.fp8_fake_quant)(x)
  assert float(jnp.max(jnp.abs(y8 - x) / (jnp.abs(x) + 1e-3))) < 0.07
  g = jax.jit(jax.grad(lambda x: jnp.sum(quant.fp4_fake_quant(x) * 2 + quant.fp8_fake_quant(x))))(x)
  np.testing.assert_array_equal(g, 3.0)


def test_sinkhorn_rows_and_columns_sum_to_one():
  logits = jax.random.normal(jax.random.key(0), (5, 7, 4, 4))
  c = jax.jit(hyper.sinkhorn, static_argnums=(1, 2))(logits, 20, 1e-6)
  assert np.all(np.asarray(c) > 0)
  np.testing.assert_allclose(jnp.sum(c, axis=-2), 1.0, atol=1e-5)  # ends on columns
  np.testing.assert_allclose(jnp.sum(c, axis=-1), 1.0, atol=1e-4)  # rows: converged


def test_hyper_connection_weights_and_mixing():
  cfg = config.preset("v4_test")
  hc = hyper.HyperConnection(cfg, rngs=nnx.Rngs(0))
  hc.base[...] = jax.random.normal(jax.random.key(1), hc.base[...].shape)
  h = jax.random.normal(jax.random.key(2), (2, 3, cfg.hc_mult, cfg.dim))
  pre, post, comb = nnx.jit(lambda hc, h: hc.weights(h))(hc, h)
  assert pre.shape == post.shape == (2, 3, 4) and comb.shape == (2, 3, 4, 4)
  assert np.all((np.asarray(post) > 0) & (np.asarray(post) < 2))
  np.testing.assert_allclose(jnp.sum(comb, axis=-2), 1.0, atol=1e-5)
  out, _ = nnx.jit(lambda hc, h: hc(h, lambda x: (x * 0, None)))(hc, h)  # F = 0: mixing only
  np.testing.assert_allclose(out, jnp.einsum("btmn,btmd->btnd", comb, h), atol=1e-5)


def test_sqrt_softplus_routing_uses_the_bias_for_selection_only():
  cfg = config.preset("v4_test", n_routed_experts=4, n_activated_experts=2, route_scale=1.5)
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
  s = moe.router_scores(logits, "sqrtsoftplus")
  np.testing.assert_allclose(s, jnp.sqrt(jnp.log1p(jnp.exp(logits))), rtol=1e-6)
  ids, w = moe.route(s, jnp.zeros(4), cfg)
  assert sorted(np.asarray(ids[0]).tolist()) == [0, 1]
  ids, w = moe.route(s, jnp.array([0.0, 0.0, 5.0, 5.0]), cfg)  # the bias flips the choice
  assert sorted(np.asarray(ids[0]).tolist()) == [2, 3]
  want = s[0, ids[0]] / jnp.sum(s[0, ids[0]]) * 1.5  # unbiased scores, normalised, scaled
  np.testing.assert_allclose(w[0], want, rtol=1e-6)


def test_hash_layer_routes_by_token_and_clamped_swiglu():
  cfg = config.preset("v4_test")
  layer = moe.V4MoE(cfg, hashed=True, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 5, cfg.dim))
  tokens = jnp.array([[3, 9, 3, 200, 9]])
  ids, w = nnx.jit(lambda layer, x, t: layer.route(x, t))(layer, x[0], tokens[0])
  np.testing.assert_array_equal(ids, moe.hash_table(cfg)[np.asarray(tokens[0])])
  assert np.all([len(set(r)) == cfg.n_activated_experts for r in np.asarray(ids)])
  np.testing.assert_allclose(jnp.sum(w, -1), cfg.route_scale, rtol=1e-6)
  h = jnp.array([-20.0, 0.5, 20.0])
  np.testing.assert_allclose(
    moe.swiglu(h, h, 10.0), jax.nn.silu(jnp.minimum(h, 10)) * jnp.clip(h, -10, 10)
  )
  y, load = nnx.jit(lambda layer, x, t: layer(x, t))(layer, x, tokens)
  assert y.shape == x.shape and float(jnp.sum(load)) == 5 * cfg.n_activated_experts
