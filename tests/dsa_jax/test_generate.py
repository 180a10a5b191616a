# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Prefill + decode over the latent / indexer caches equals the full-sequence forward."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsa_jax
from dsa_jax import cache as cache_lib
from dsa_jax import generate, layers, model

L = 40  # > index_topk=16 of the test preset: DSA decode is really sparse past position 15
PROMPT = (8, 5)  # right-padded ragged batch: request 1's prompt is shorter
# XLA:CPU compiles these graphs 2x faster without LLVM's expensive passes (CI time).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# Max |decode logit - forward logit|. fp32 caches: the same math in another order (MQA vs MHA
# path, cached vs fresh rows). fp8 latent: e4m3 has 3 mantissa bits, so c carries ~2^-5 relative
# error per element (bf16 rope 2^-9); at this init the logits move ~4e-4 (measured).
TOL = {"float32": 1e-5, "fp8": 2e-3, "bfloat16": 3e-2}


@functools.lru_cache(maxsize=None)
def _setup(compute_dtype="float32"):
  cfg = dsa_jax.preset("test", compute_dtype=compute_dtype)
  m = model.build(cfg, seed=0)
  graphdef, state = nnx.split(m)
  return cfg, graphdef, state


def _compile(fn, fast, *args):
  return jax.jit(fn).lower(*args).compile(FAST if fast else None)


@functools.lru_cache(maxsize=None)
def _forward(attention, compute_dtype="float32"):
  cfg, graphdef, state = _setup(compute_dtype)
  tok = jax.random.randint(jax.random.key(0), (2, L), 0, cfg.vocab_size)
  f = lambda st, t: nnx.merge(graphdef, st)(t, attention=attention)[0]
  return tok, _compile(f, compute_dtype == "float32", state, tok)(state, tok)


@pytest.mark.parametrize(
  "attention,fp8,compute_dtype",
  [
    ("dense", False, "float32"),
    ("sparse", False, "float32"),
    ("sparse", True, "float32"),
    pytest.param("dense", True, "float32", marks=pytest.mark.slow),
    # XLA:CPU cannot run some bf16 x bf16 -> f32 dots of the MQA paths (the model's own
    # dense_mqa / sparse forward fails the same way): bf16 runs on a GPU only.
    pytest.param("dense", False, "bfloat16", marks=pytest.mark.gpu),
    pytest.param("sparse", True, "bfloat16", marks=pytest.mark.gpu),
  ],
)
def test_decode_matches_forward(attention, fp8, compute_dtype):
  if compute_dtype == "bfloat16" and jax.default_backend() == "cpu":
    pytest.skip("bf16 MQA dots are unimplemented on XLA:CPU")
  cfg, graphdef, state = _setup(compute_dtype)
  tok, ref = _forward(attention, compute_dtype)
  lengths = np.array(PROMPT, np.int32)
  p = max(PROMPT)
  prompt = np.array(tok[:, :p])
  prompt[1, PROMPT[1] :] = 7  # padding after request 1's prompt must stay invisible
  cache = cache_lib.init(cfg, 2, L, fp8=fp8, indexer=attention == "sparse")

  pre = lambda st, t, n, c: generate.prefill(nnx.merge(graphdef, st), t, n, c, attention=attention)
  dec = lambda st, t, c: generate.decode(nnx.merge(graphdef, st), t, c, attention=attention)
  fast = compute_dtype == "float32"
  logits, cache = _compile(pre, fast, state, prompt, lengths, cache)(state, prompt, lengths, cache)
  step = _compile(dec, fast, state, tok[:, :1], cache)
  got = [logits]
  rows = np.arange(2)
  for i in range(L - max(PROMPT)):
    nxt = tok[rows, lengths + i][:, None]  # teacher forcing: each request's own next token
    logits, cache = step(state, nxt, cache)
    got.append(logits[:, 0])
  got = np.stack(got, axis=1)  # [B, steps+1, V] at positions lengths-1+i
  want = np.stack([np.asarray(ref)[b, lengths[b] - 1 :][: got.shape[1]] for b in rows])
  # fp8 caches in a bf16 model: the larger of the two (one bf16 ulp of a logit near 1 is 3.9e-3).
  tol = max(TOL["fp8"], TOL[compute_dtype]) if fp8 else TOL[compute_dtype]
  err = np.abs(got - want).max()
  assert err <= tol, (err, tol)
  np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + L - max(PROMPT))
  if not fp8 and compute_dtype == "float32":  # greedy choices agree everywhere
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("fp8,latent,indexer", [(True, 656, 132), (False, 1152, 256)])
def test_cache_bytes_per_token_v32(fp8, latent, indexer):
  cfg = dsa_jax.preset("v32_671b")
  c = cache_lib.abstract(cfg, batch=2, max_len=128, fp8=fp8)
  got = cache_lib.bytes_per_token(c)
  assert (got["latent"], got["indexer"]) == (latent, indexer)
  assert got["total_all_layers"] == (latent + indexer) * cfg.n_layers
  # docs/dsa.md §FP8 formats: 128K tokens x 62 layers (with MTP) of fp8 latent + indexer keys
  # = 5.96 GiB
  if fp8:
    assert round((latent + indexer) * 131072 * 62 / 2**30, 2) == 5.96
    lc = c.layers[0]
    assert lc.c.dtype == jnp.float8_e4m3fn and lc.c_scale.shape[-1] == 4
    assert lc.pe.dtype == jnp.bfloat16 and lc.ik_scale.dtype == jnp.float32


def test_fp8_records_roundtrip_and_byte_layout():
  cfg = dsa_jax.preset("test", kv_lora_rank=256, compute_dtype="bfloat16")  # 2 tiles of 128
  cache = cache_lib.init(cfg, 1, 4, fp8=True)
  k = jax.random.split(jax.random.key(1), 3)
  c = jax.random.normal(k[0], (1, 2, 256)) * jnp.array([1.0] * 128 + [30.0] * 128)
  pe = jax.random.normal(k[1], (1, 2, cfg.qk_rope_head_dim))
  ik = layers.hadamard(jax.random.normal(k[2], (1, 2, cfg.index_head_dim)))
  lc = jax.jit(functools.partial(cache_lib.write, cfg))(
    cache.layers[0], jnp.array([[1, 3]]), c, pe, ik
  )
  # per-tile power-of-two scales; the second tile's is ~30x larger
  s = np.asarray(lc.c_scale[0, [1, 3]])
  np.testing.assert_array_equal(np.log2(s), np.round(np.log2(s)))
  assert (s[:, 1] / s[:, 0]).min() >= 8
  kv = np.asarray(cache_lib.read_latent(lc, jnp.float32))[0, [1, 3]]
  np.testing.assert_allclose(kv[:, :256], c[0], rtol=0.07, atol=0.07 * 30 * 2**-6)
  np.testing.assert_allclose(kv[:, 256:], pe[0], rtol=2**-8)
  assert not np.asarray(cache_lib.read_latent(lc, jnp.float32))[0, [0, 2]].any()  # untouched
  rec = np.asarray(cache_lib.packed_latent(lc))[0, 3]
  assert rec.shape == (256 + 2 * 4 + cfg.qk_rope_head_dim * 2,)
  np.testing.assert_array_equal(rec[:256].view(jnp.float8_e4m3fn), np.asarray(lc.c[0, 3]))
  np.testing.assert_array_equal(rec[256:264].view(np.float32), s[1])
  np.testing.assert_array_equal(rec[264:].view(jnp.bfloat16), np.asarray(lc.pe[0, 3]))
  irec = np.asarray(cache_lib.packed_indexer(lc))[0, 3]
  assert irec.shape == (cfg.index_head_dim + 4,)
  ki = irec[:-4].view(jnp.float8_e4m3fn).astype(np.float32) * irec[-4:].view(np.float32)
  np.testing.assert_allclose(ki, np.asarray(ik[0, 1]), rtol=0.07, atol=1e-3)


def test_sample_greedy_temperature_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))

  @jax.jit
  def draws(key):
    s = functools.partial(generate.sample, logits, key)
    return [s(), s(temperature=1.0, top_p=0.4), s(temperature=1.0), s(temperature=1.0, top_p=0.7)]

  greedy, tiny_p, plain, nucleus = (
    np.bincount(np.asarray(x), minlength=4) / 4000 for x in draws(jax.random.key(0))
  )
  np.testing.assert_array_equal(greedy, [1, 0, 0, 0])
  np.testing.assert_array_equal(tiny_p, [1, 0, 0, 0])  # the top token always stays
  np.testing.assert_allclose(plain, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  # top_p=0.7: the nucleus is {0, 1} (0.5 < 0.7 <= 0.8), renormalised to 5/8, 3/8
  assert nucleus[2:].sum() == 0 and abs(nucleus[0] - 0.625) < 0.03
  with pytest.raises(ValueError, match="top_p"):
    generate.sample(logits, jax.random.key(0), temperature=1.0, top_p=0.0)


def test_generate_ragged_batch_sampling_and_eos():
  cfg = dsa_jax.preset("test", n_layers=1, n_dense_layers=1, index_topk=4)  # cheap to compile
  m = model.build(cfg, seed=3)
  a, b = [5, 9, 2, 7, 1, 3, 11, 12], [4, 8]
  gen = generate.GenerateConfig(max_new_tokens=8, attention="sparse", fp8_cache=True)
  both = generate.generate(m, [a, b], gen)
  assert [len(s) for s in both] == [8, 8]
  # a request's tokens do not depend on its neighbour's length (same shapes: no recompilation)
  assert generate.generate(m, [a, a], gen)[0] == both[0]
  assert generate.generate(m, [b, b], gen)[0] == both[1]
  eos = both[0][2]
  cut = generate.generate(m, [a, b], dataclasses.replace(gen, eos_id=eos))
  assert cut[0] == both[0][: both[0].index(eos) + 1]
  hot = dataclasses.replace(gen, temperature=1.0, top_p=0.9, seed=1)
  s1, s2 = generate.generate(m, [a, b], hot), generate.generate(m, [a, b], hot)
  assert s1 == s2 and s1 != both  # seeded sampling: reproducible, not greedy
  with pytest.raises(ValueError, match="max_seq_len"):
    generate.generate(m, [[1] * (cfg.max_seq_len - 4)], gen)
