# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax import config, layers


@pytest.mark.parametrize("n", [2, 32, 128])
def test_hadamard_orthonormal_and_symmetric(n):
  h = layers.hadamard_matrix(n)
  np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
  np.testing.assert_allclose(h, h.T)
  x = jax.random.normal(jax.random.key(0), (5, n))
  y = jax.random.normal(jax.random.key(1), (5, n))
  # Scores are invariant: Ĥq·Ĥk == q·k (docs/dsa.md §Invariants)
  np.testing.assert_allclose(
    jnp.sum(layers.hadamard(x) * layers.hadamard(y), -1), jnp.sum(x * y, -1), rtol=1e-5, atol=1e-5
  )
  # natural (Sylvester) order: first row constant
  np.testing.assert_allclose(h[0], np.full(n, 1 / np.sqrt(n)), rtol=1e-6)


def test_yarn_frequencies_match_spec_table():
  f = layers.yarn_inv_freq(config.preset("v32_671b"))
  spec = {
    0: 1.0,
    1: 0.7499,
    5: 0.2371,
    10: 0.05623,
    11: 0.03901,
    16: 0.0055,
    22: 0.0001778,
    23: 3.334e-5,
    31: 3.334e-6,
  }
  for i, v in spec.items():
    assert f[i] == pytest.approx(v, rel=2e-3), i


def test_rope_conventions_differ_and_preserve_norm():
  cfg = config.preset("test")
  pos = jnp.arange(7)[None]
  cos, sin = layers.rope_angles(cfg, pos)
  x = jax.random.normal(jax.random.key(0), (1, 7, cfg.qk_rope_head_dim))
  a, b = layers.rope_interleaved(x, cos, sin), layers.rope_half(x, cos, sin)
  np.testing.assert_allclose(jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(b, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  assert float(jnp.abs(a[0, 3:] - b[0, 3:]).max()) > 1e-2  # the two pairings are not the same
  # half-split pairs (x[i], x[i+R/2]): rotating e_0 moves mass only into dim R/2
  e0 = jnp.zeros((1, 7, cfg.qk_rope_head_dim)).at[..., 0].set(1.0)
  r = layers.rope_half(e0, cos, sin)
  h = cfg.qk_rope_head_dim // 2
  np.testing.assert_allclose(r[0, :, 0], cos[0, :, 0], rtol=1e-6)
  np.testing.assert_allclose(r[0, :, h], sin[0, :, 0], rtol=1e-6)
  ri = layers.rope_interleaved(e0, cos, sin)
  np.testing.assert_allclose(ri[0, :, 1], sin[0, :, 0], rtol=1e-6)
  # relative position property: <R_p q, R_s k> depends on p - s only
  q = jax.random.normal(jax.random.key(2), (cfg.qk_rope_head_dim,))
  k = jax.random.normal(jax.random.key(3), (cfg.qk_rope_head_dim,))
  qs = layers.rope_half(jnp.broadcast_to(q, (1, 7, q.size)), cos, sin)[0]
  ks = layers.rope_half(jnp.broadcast_to(k, (1, 7, k.size)), cos, sin)[0]
  assert float(qs[5] @ ks[2]) == pytest.approx(float(qs[4] @ ks[1]), rel=1e-4)


def test_softmax_scale_mscale():
  assert config.preset("v32_671b").softmax_scale == pytest.approx(0.13523378, abs=1e-8)
  no_yarn = config.preset("test", max_seq_len=64, original_seq_len=64)
  assert no_yarn.softmax_scale == pytest.approx(no_yarn.qk_head_dim**-0.5)


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_quantisation_error_bounds(scale_fmt):
  x = 3.0 * jax.random.normal(jax.random.key(0), (64, 128))
  x = x.at[0].set(x[0] * 1e-3)
  q, s = layers.fp8_quantize(x, scale_fmt)
  assert q.dtype == jnp.float8_e4m3fn
  y = layers.fp8_quant_dequant(x, scale_fmt)
  # e4m3 has 3 mantissa bits: |err| <= 2^-4 relative to the element, plus subnormal spacing
  # (2^-9 · scale) for tiny elements.
  bound = jnp.abs(x) * 2.0**-4 + s * 2.0**-9
  assert bool(jnp.all(jnp.abs(y - x) <= bound + 1e-12))
  amax = jnp.max(jnp.abs(x), -1, keepdims=True)
  assert bool(jnp.all(amax / s <= 448.0 + 1e-3))
  if scale_fmt == "ue8m0":
    m, _ = jnp.frexp(s)
    assert bool(jnp.all(m == 0.5))  # powers of two
    assert bool(jnp.all(amax / s > 224.0 - 1e-3))  # tightest power of two
  # straight-through gradient
  g = jax.grad(lambda v: jnp.sum(layers.fp8_quant_dequant(v, scale_fmt) * 2.0))(x)
  np.testing.assert_allclose(g, 2.0)


def test_norms():
  x = jax.random.normal(jax.random.key(0), (3, 16)) * 5 + 2
  y = layers.RMSNorm(16, 1e-6)(x)
  np.testing.assert_allclose(jnp.mean(y * y, -1), 1.0, rtol=1e-4)
  z = layers.LayerNorm(16, 1e-6)(x)
  np.testing.assert_allclose(jnp.mean(z, -1), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.var(z, -1), 1.0, rtol=1e-4)
