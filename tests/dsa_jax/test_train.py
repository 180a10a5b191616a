# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
import dataclasses
import functools
import os
import re
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsa_jax
from dsa_jax import data, losses, model, optim, train

SEQ = 64


def _cfg(phase, steps=20, **kw):
  mc = dsa_jax.preset("test", attn_block_q=SEQ)  # one query block: quick to compile
  return train.TrainConfig(
    model=mc,
    phase=train.phase(phase),
    optim=optim.OptimConfig(lr=3e-3, warmup_steps=2, total_steps=steps),
    data=data.DataConfig(source="text", seq_len=SEQ, batch_size=2),
    ckpt=train.CkptConfig(**{"every": 1000, "async_save": False, **kw.pop("ckpt", {})}),
    steps=steps,
    log_every=1,
    eval_batches=1,
    progress=False,
    **{"eval_metrics": False, **kw},
  )


@functools.lru_cache(maxsize=None)
def _trainer(phase):
  return train.Trainer(_cfg(phase))


def _run(trainer, state, steps, start=0):
  hist = []
  for s in range(start, start + steps):
    b = trainer.put_batch(data.batch(trainer.cfg.data, s))
    state, m = trainer.train_step(state, b)
    hist.append({k: float(v) for k, v in m.items()})
  return state, hist


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("phase", ["dense", "warmup", "sparse"])
def test_twenty_steps_lower_the_loss(phase):
  tr = _trainer(phase)
  state = tr.init_state(model.build(tr.cfg.model, seed=0))
  # warm-up needs a target worth fitting: any fixed model's attention is one
  _, hist = _run(tr, state, 20)
  key = "indexer_kl" if phase == "warmup" else "lm_loss"
  first, last = np.mean([h[key] for h in hist[:3]]), np.mean([h[key] for h in hist[-3:]])
  assert last < first, (phase, first, last)
  assert all(np.isfinite(h["loss"]) for h in hist)


def test_warmup_freezes_everything_but_the_indexer():
  tr = _trainer("warmup")
  m = model.build(tr.cfg.model, seed=1)
  before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(m)))  # host copies
  state = tr.init_state(m)
  # optimizer state exists only for indexer parameters
  paths = [optim.path_str(p) for p, _ in nnx.to_flat_state(state.params)]
  assert paths and all("indexer" in p for p in paths)
  n_idx = sum("indexer" in optim.path_str(p) for p, _ in nnx.to_flat_state(nnx.state(m)))
  assert len(paths) == n_idx
  state, _ = _run(tr, state, 3)
  after = tr.full_params(state)
  flat_b, flat_a = nnx.traversals.flatten_mapping(before), nnx.traversals.flatten_mapping(after)
  changed = [k for k in flat_b if not np.array_equal(flat_b[k], flat_a[k])]
  assert changed and all("indexer" in "/".join(map(str, k)) for k in changed), changed[:5]


def _grads(phase, which):
  """Gradients of the LM loss or of the indexer KL alone, w.r.t. every parameter."""
  cfg = _cfg(phase)
  m = model.build(cfg.model, seed=2)
  gd, params, rest = nnx.split(m, nnx.Param, ...)
  b = data.batch(cfg.data, 0)
  tok = jnp.asarray(b["tokens"])

  def f(params):
    logits, aux = nnx.merge(gd, params, rest)(
      tok, attention=cfg.phase.attention, indexer_loss=cfg.phase.indexer_loss
    )
    if which == "lm":
      return losses.lm_loss(logits, tok, jnp.asarray(b["loss_mask"]))
    return losses.indexer_kl(aux)

  g = jax.grad(f)(params)
  out = {}
  for p, v in nnx.to_flat_state(g):
    out[optim.path_str(p)] = float(jnp.max(jnp.abs(v.get_value())))
  return out


@pytest.mark.parametrize("phase", ["sparse", "warmup"])
def test_gradient_isolation(phase):
  kl = _grads(phase, "kl")
  # the KL reaches the indexer and nothing else
  assert max(v for k, v in kl.items() if "indexer" in k) > 0
  leak = {k: v for k, v in kl.items() if "indexer" not in k and v != 0}
  assert not leak, leak
  if phase == "sparse":
    lm = _grads(phase, "lm")
    assert max(v for k, v in lm.items() if "indexer" not in k) > 0
    leak = {k: v for k, v in lm.items() if "indexer" in k and v != 0}
    assert not leak, leak


def test_resume_is_bitwise_identical(tmp_path):
  cfg = _cfg("sparse", steps=4, ckpt={"every": 2})
  tr = train.Trainer(cfg)  # one compile for the three runs (they differ only in `steps`)
  full = train.train(cfg, str(tmp_path / "a"), trainer=tr)
  # interrupted: stop after 2 steps (steps=2 with the same schedule), then resume to 4
  train.train(dataclasses.replace(cfg, steps=2), str(tmp_path / "b"), trainer=tr)
  resumed = train.train(cfg, str(tmp_path / "b"), trainer=tr)
  sa, sb = (
    train.restore_latest(tr, str(tmp_path / "a")),
    train.restore_latest(tr, str(tmp_path / "b")),
  )
  a = _leaves(tr.full_params(sa)) + _leaves((sa.opt_state, sa.rng, sa.step))
  b = _leaves(tr.full_params(sb)) + _leaves((sb.opt_state, sb.rng, sb.step))
  assert len(a) == len(b) and int(sa.step) == 4
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert full["train"]["loss"] == resumed["train"]["loss"]
  assert set(full) == {"step", "train", "preempted", "signal", "eval"}  # JSON-able, nothing private
  with pytest.raises(ValueError, match="another config"):
    tr.reuse_for(_cfg("dense", steps=4))


def test_init_from_previous_phase_and_errors(tmp_path):
  dense = train.train(_cfg("dense", steps=1), str(tmp_path / "dense"))
  cfg = _cfg("warmup", steps=1, ckpt={"init_from": str(tmp_path / "dense")})
  warm = train.train(cfg, str(tmp_path / "warm"))
  assert dense["step"] == warm["step"] == 1
  params = lambda wd: nnx.to_pure_dict(nnx.state(train.load_init_params(wd, cfg.model)))
  d = nnx.traversals.flatten_mapping(params(str(tmp_path / "dense")))
  w = nnx.traversals.flatten_mapping(params(str(tmp_path / "warm")))
  for k in d:
    if "indexer" not in "/".join(map(str, k)) and "gate_bias" not in k:
      np.testing.assert_array_equal(d[k], w[k])
  # mismatched model -> error naming the parameters
  bad = _cfg("warmup", steps=1, ckpt={"init_from": str(tmp_path / "dense")})
  bad = train.TrainConfig(**{**bad.__dict__, "model": bad.model.replace(dim=32)})
  with pytest.raises(ValueError, match="wrong shapes"):
    train.train(bad, str(tmp_path / "bad"))
  with pytest.raises(ValueError, match="step not found"):
    train.load_init_params(str(tmp_path / "dense") + "@7", cfg.model)
  # a corrupt checkpoint is reported, not silently skipped
  ck = tmp_path / "dense" / "checkpoints" / "1" / "params"
  for root, _, files in os.walk(ck):
    for f in files:
      if f.endswith(".ocdbt") or "manifest" in f or f == "_METADATA":
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  with pytest.raises(ValueError):
    train.load_init_params(str(tmp_path / "dense"), cfg.model)


def test_sigterm_saves_and_exits(tmp_path):
  cfg = _cfg("dense", steps=10_000)
  # from another thread, as a scheduler's signal arrives: the handler runs between steps
  kill = lambda step, m: (
    step == 3 and threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM)).start()
  )
  r = train.train(cfg, str(tmp_path / "run"), log_fn=kill)
  assert r["preempted"] and r["signal"] == "SIGTERM" and 3 <= r["step"] < 10_000
  ckpts = os.listdir(tmp_path / "run" / "checkpoints")
  assert max(int(d) for d in ckpts if d.isdigit()) == r["step"]


def test_data_is_deterministic_and_host_sharded():
  dc = data.DataConfig(source="mixed", seq_len=256, batch_size=4)
  a = data.batch(dc, 3)
  b = data.batch(dc, 3)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  h0 = data.batch(dc, 3, host=0, n_hosts=2)
  h1 = data.batch(dc, 3, host=1, n_hosts=2)
  np.testing.assert_array_equal(np.concatenate([h0["tokens"], h1["tokens"]]), a["tokens"])
  assert not np.array_equal(data.batch(dc, 4)["tokens"], a["tokens"])
  toks, mask, dist = data.passkey_eval_batch(256, [10, 200], 2)
  for t, m in zip(toks, mask):
    key = bytes(t[m > 0].astype(np.uint8))
    assert key.isdigit() and bytes(t.astype(np.uint8)).count(key) == 2
  with pytest.raises(ValueError, match="source"):
    data.DataConfig(source="web")


def test_user_text_directory(tmp_path):
  for i in range(21):
    (tmp_path / f"d{i}.txt").write_text(f"document {i} " * 50)
  (tmp_path / "x.jsonl").write_text('{"text": "hello json"}\n')
  dc = data.DataConfig(source="dir", path=str(tmp_path), seq_len=64, batch_size=2)
  b = data.batch(dc, 0)
  assert b["tokens"].shape == (2, 64) and b["tokens"].max() < 256
  assert data.batch(dc, 0, split="eval")["tokens"].shape == (2, 64)
  (tmp_path / "bad.jsonl").write_text("not json\n")
  data.dir_corpus.cache_clear()
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    data.batch(dc, 0)


@pytest.mark.parametrize("t, chunk", [(37, 8), (16, 16), (5, 64)])
def test_head_xent_equals_the_full_logits(t, chunk):
  """Chunked cross-entropy = xent of the whole logits, value and gradients (x and the head),
  with a ragged last chunk, zero weights, and a chunk longer than the sequence."""
  kx, kw, kt, km = jax.random.split(jax.random.key(0), 4)
  b, d, v = 2, 16, 50
  x = jax.random.normal(kx, (b, t, d), jnp.float32)
  w = jax.random.normal(kw, (d, v), jnp.float32) * 0.3
  tgt = jax.random.randint(kt, (b, t), 0, v)
  wts = (jax.random.uniform(km, (b, t)) > 0.3).astype(jnp.float32)

  def full(x, w):
    return losses.xent(jnp.einsum("btd,dv->btv", x, w), tgt, wts)

  def chunked(x, w):
    return losses.head_xent(x, w, jnp.float32, tgt, wts, chunk)

  with jax.default_matmul_precision("highest"):
    (lf, gf), (lc, gc) = [jax.value_and_grad(f, (0, 1))(x, w) for f in (full, chunked)]
  np.testing.assert_allclose(lc, lf, rtol=1e-6)
  for a, e in zip(gc, gf):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="chunk=0 must be >= 1"):
    losses.head_xent(x, w, jnp.float32, tgt, wts, 0)


def test_head_xent_builds_each_chunks_logits_once():
  """Differentiated, the chunked cross-entropy multiplies by the head three times per chunk
  (logits, dx, d kernel) in one scan; the backward does not rebuild the logits (a fourth)."""
  x = jnp.ones((1, 32, 16), jnp.bfloat16)
  w = jnp.ones((16, 40), jnp.float32)
  tgt, wts = jnp.zeros((1, 32), jnp.int32), jnp.ones((1, 32), jnp.float32)
  loss = lambda x, w: losses.head_xent(x, w, jnp.bfloat16, tgt, wts, 8)
  grad = jax.jit(jax.value_and_grad(loss, (0, 1)))
  hlo = grad.lower(x, w).compile().as_text()
  assert len(re.findall(r"= \S+ dot\(", hlo)) == 3, hlo


def test_loss_chunk_gives_the_same_step():
  """TrainConfig.loss_chunk (LM and MTP cross-entropy a chunk at a time) gives the same losses,
  update and eval loss as the whole logits."""
  out = []
  for chunk in (0, 24):
    cfg = dataclasses.replace(
      _cfg("dense"), loss_chunk=chunk, phase=train.phase("dense", mtp_weight=0.3)
    )
    tr = train.Trainer(cfg)
    state = tr.init_state()
    b = tr.put_batch(data.batch(cfg.data, 0))
    with jax.default_matmul_precision("highest"):
      new, m = tr.train_step(state, b)
      ev = tr.eval_step(new, b)
    out.append((m, new.params, ev))
  (m0, p0, e0), (m1, p1, e1) = out
  for k in ("lm_loss", "mtp_loss", "loss", "grad_norm"):
    np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, err_msg=k)
  for a, e in zip(_leaves(p1), _leaves(p0)):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(e1["eval_loss"], e0["eval_loss"], rtol=1e-5)
  with pytest.raises(ValueError, match="loss_chunk"):
    dataclasses.replace(_cfg("dense"), loss_chunk=-1)
