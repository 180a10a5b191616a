# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""V4 decoding (docs/v4.md §Decoding): prefill + decode steps equal the full forward.

The `v4_test` model has a window-only, a CSA (m = 4) and an HCA (m = 16) layer, window 8. Two
requests of prompt lengths 3 (< m) and 21 (> window, past an HCA block) decode 23 tokens each,
so both cross CSA and HCA block boundaries; top-k 4 selects every visible entry up to position
18 and fewer than the visible ones after (up to 11), top-k 16 all of them.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsa_jax import generate as generate_lib
from dsa_jax import v4
from dsa_jax.v4 import cache as cache_lib
from dsa_jax.v4 import decode as decode_lib

LENS = (3, 21)
STEPS = 23
TOL = 1e-5


def _model(**kw):
  """v4_test with larger weights and random ape / sinks / router biases (zero at init)."""
  cfg = v4.preset("v4_test", init_std=0.05, **kw)
  model = v4.build(cfg, seed=1)
  rng = np.random.default_rng(2)
  graphdef, state = nnx.split(model)

  def perturb(path, var):
    if path[-1] in ("ape", "attn_sink", "gate_bias"):
      x = rng.standard_normal(var.get_value().shape).astype(np.float32)
      return var.replace(value=jnp.asarray(x, var.get_value().dtype))
    return var

  return nnx.merge(graphdef, nnx.map_state(perturb, state))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("attention",))
def _forward(graphdef, state, tokens, *, attention):
  return nnx.merge(graphdef, state)(tokens, attention=attention)[0]


def _tokens(cfg, n):
  return jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, n)), jnp.int32)


def _check(got, want, what):
  err = float(jnp.max(jnp.abs(got - want)))
  rel = err / float(jnp.max(jnp.abs(want)))
  assert err <= TOL and rel <= TOL, f"{what}: max abs err {err:.2e}, rel {rel:.2e}"
  return err


@pytest.mark.parametrize(
  "attention,topk,fp8",
  [
    # top-k 4: both regimes in one run (visible entries <= 4 before position 19, up to 11 after)
    ("sparse", 4, False),
    # every visible entry selected; fp8 window / entry caches
    pytest.param("sparse", 16, True, marks=pytest.mark.slow),
    pytest.param("dense", 4, False, marks=pytest.mark.slow),
  ],
)
def test_decode_matches_forward(attention, topk, fp8):
  model = _model(index_topk=topk)
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  toks = _tokens(cfg, max(LENS) + STEPS)
  full = _forward(graphdef, state, toks, attention=attention)
  lens = np.array(LENS)
  cache = cache_lib.init(cfg, 2, 64, fp8=fp8)
  logits, cache = decode_lib.prefill_step(
    graphdef, state, toks[:, : max(LENS)], jnp.asarray(lens), cache, attention=attention
  )
  rows = np.arange(2)
  _check(logits, full[rows, lens - 1], "prefill")
  got, want = [], []
  for step in range(STEPS):
    nxt = toks[rows, lens + step][:, None]
    logits, cache = decode_lib.decode_step(graphdef, state, nxt, cache, attention=attention)
    got.append(logits[:, 0])
    want.append(full[rows, lens + step])
  _check(jnp.stack(got, 1), jnp.stack(want, 1), f"decode {attention} top-k {topk}")
  assert np.array_equal(np.asarray(cache.lengths), lens + STEPS)
  if topk == 4:  # both regimes: fewer visible entries than k early, more at the end
    assert LENS[0] // 4 < topk < (max(LENS) + STEPS) // 4


@pytest.mark.slow
def test_decode_chunks_match_forward():
  """Decode chunks of several tokens (longer than the window and the compressor state) too."""
  model = _model()
  cfg = model.cfg
  toks = _tokens(cfg, 40)
  full, _ = model(toks, attention="sparse")
  lens = np.array([2, 3])  # a prefill with no complete block
  cache = cache_lib.init(cfg, 2, 64)
  logits, cache = decode_lib.prefill(
    model, toks[:, :3], jnp.asarray(lens), cache, attention="sparse"
  )
  rows = np.arange(2)
  _check(logits, full[rows, lens - 1], "prefill")
  done = 0
  for t in (3, 1, 9, 5):
    idx = lens[:, None] + done + np.arange(t)[None]
    logits, cache = decode_lib.decode(model, toks[rows[:, None], idx], cache, attention="sparse")
    _check(logits, full[rows[:, None], idx], f"chunk of {t}")
    done += t


def test_ring_positions():
  pos = np.asarray(cache_lib.ring_positions(jnp.array([0, 3, 8, 11]), 4))
  assert pos.tolist() == [[-4, -3, -2, -1], [0, 1, 2, -1], [4, 5, 6, 7], [8, 9, 10, 7]]


def test_cache_layout_and_memory():
  cfg = v4.preset("v4_test")
  c = cache_lib.init(cfg, 2, 64)
  win, csa, hca = c.layers
  assert win.comp is None and win.entries is None and win.window.x.shape == (2, 8, 32)
  assert csa.comp.kv.shape == (2, 8, 64) and csa.entries.x.shape == (2, 16, 32)
  assert csa.icomp.kv.shape == (2, 8, 32) and csa.ikeys.shape == (2, 16, 16)
  assert hca.comp.kv.shape == (2, 16, 32) and hca.entries.x.shape == (2, 4, 32)
  assert hca.ikeys is None
  # V4-Flash at 1M positions (abstract): bf16 entries, fp32 indexer keys; per position
  # 21 CSA layers x (512·2 + 128·4) / 4 + 20 HCA layers x 512·2 / 128 = 8224 B.
  flash = cache_lib.abstract(v4.preset("v4_flash"), 1, 1 << 20)
  assert cache_lib.memory(flash)["per_token"] == 21 * 384 + 20 * 8
  # fp8: 448 e4m3 + 7 fp32 scales + 64 bf16 = 604 B per entry.
  flash8 = cache_lib.abstract(v4.preset("v4_flash"), 1, 1 << 20, fp8=True)
  assert cache_lib.memory(flash8)["per_token"] == 21 * (604 + 512) / 4 + 20 * 604 / 128


def test_fp8_rows_lossless_on_kv_quant_values():
  cfg = v4.preset("v4_test")
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  from dsa_jax.v4.compressor import quant_nope

  xq = quant_nope(x, cfg)
  like = cache_lib.init(cfg, 2, 8, fp8=True).layers[0].window
  back = cache_lib.decode_rows(cache_lib.encode(cfg, like, xq), jnp.float32)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(xq))
  with pytest.raises(ValueError, match="kv_quant"):
    cache_lib.init(v4.preset("v4_test", kv_quant="none"), 1, 8, fp8=True)


@pytest.mark.slow
def test_generate_v4_greedy_matches_forward_argmax():
  """`dsa_jax.generate.generate` runs V4 models; greedy tokens re-scored by the forward agree."""
  model = _model()
  gen = generate_lib.GenerateConfig(max_new_tokens=5, attention="sparse")
  prompts = [[5, 6, 7], list(range(10, 30))]
  out = generate_lib.generate(model, prompts, gen)
  graphdef, state = nnx.split(model)
  for p, o in zip(prompts, out):
    assert len(o) == 5
    seq = jnp.asarray([p + o], jnp.int32)
    logits = _forward(graphdef, state, seq, attention="sparse")[0]
    assert np.asarray(jnp.argmax(logits[len(p) - 1 : -1], -1)).tolist() == o


@pytest.mark.slow
def test_decode_converted_golden_matches_transformers(tmp_path, load_launcher):
  """The transformers golden (tests/goldens/deepseek_v4_tiny: window, CSA, HCA m = 16, CSA)
  converted, then prefill 10 tokens + 54 decode steps: the logits equal transformers' full
  forward (both regimes, top-k 4 and 16); `experiments.generate` reads the converted config."""
  from dsa_jax import checkpoint
  from dsa_jax.convert import deepseek_v4_hf as cv

  generate_cli = load_launcher("generate")

  golden = os.path.join(os.path.dirname(__file__), "..", "..", "goldens", "deepseek_v4_tiny")
  path = str(tmp_path / "o")
  cv.hf_to_orbax(golden, path, progress=False)
  assert generate_cli.model_config(path, "test").compress_ratios == (0, 4, 16, 4)
  tokens = jnp.asarray(np.load(os.path.join(golden, "input_ids.npy")))
  b, n = tokens.shape
  for topk in (16, 4):
    cfg = generate_cli.model_config(path, "test").replace(
      index_topk=topk, compute_dtype="float32", indexer_quant="none", kv_quant="none"
    )
    model = checkpoint.load_params(path, v4.build(cfg))
    want = np.load(os.path.join(golden, f"logits_topk{topk}.npy"))
    graphdef, state = nnx.split(model)
    cache = cache_lib.init(cfg, b, n)
    p = 10
    first, cache = decode_lib.prefill_step(
      graphdef, state, tokens[:, :p], jnp.full((b,), p), cache, attention="sparse"
    )
    got = [first]
    for t in range(p, n):
      logits, cache = decode_lib.decode_step(
        graphdef, state, tokens[:, t : t + 1], cache, attention="sparse"
      )
      got.append(logits[:, 0])
    _check(jnp.stack(got, 1), want[:, p - 1 :], f"golden top-k {topk}")
