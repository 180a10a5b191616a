# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Issue 21: the positional controls (window / random selections) against references, the
retrieval data's distances, the launcher's evaluation pieces, and its CPU-sized stage chain."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsa_jax
from dsa_jax import data, generate, layers, mla, model, retrieval_data, selection, train
from pallas_kernels.sparse_mla import reference as sparse_ref

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


# ------------------------------------------------------------------------------------ selections
def _windowed_attention(q, kv, k, scale, d_v):
  """Naive softmax over the keys s with p - k < s <= p (query p = S - T + t)."""
  t, s = q.shape[1], kv.shape[1]
  p = s - t + jnp.arange(t)[:, None]
  keep = (jnp.arange(s)[None] <= p) & (jnp.arange(s)[None] > p - k)  # [T,S]
  logits = jnp.einsum("bthc,bsc->bths", q, kv) * scale
  w = jax.nn.softmax(jnp.where(keep[None, :, None], logits, -jnp.inf), axis=-1)
  return jnp.einsum("bths,bsv->bthv", w, kv[..., :d_v])


@pytest.mark.parametrize("t,s,k", [(24, 24, 5), (10, 24, 7), (24, 24, 40)])
def test_window_selection_is_windowed_causal_attention(t, s, k):
  q = jax.random.normal(jax.random.key(0), (2, t, 3, 16))
  kv = jax.random.normal(jax.random.key(1), (2, s, 16))
  idx = selection.select("window", 2, t, s, k)
  out, _ = sparse_ref.sparse_mla_reference(q, kv, idx, scale=0.2, d_v=12, block_t=8)
  np.testing.assert_allclose(out, _windowed_attention(q, kv, k, 0.2, 12), atol=1e-5, rtol=1e-5)


def _check_layout(idx, pos, k):
  """select_topk's layout: min(k, p+1) valid causal keys, ascending, unique, then -1."""
  idx, pos = np.asarray(idx), np.asarray(pos)
  for row, p in zip(idx.reshape(-1, k), pos.reshape(-1)):
    n = min(k, p + 1)
    assert (row[n:] == -1).all() and (row[:n] >= 0).all() and (row[:n] <= p).all()
    assert (np.diff(row[:n]) > 0).all()  # ascending, so no duplicates


@pytest.mark.parametrize("mode", selection.MODES)
def test_random_selections_causal_deterministic_positional(mode):
  k, pos = 16, np.arange(300)
  a = np.asarray(selection.at_positions(mode, pos, k, seed=3))
  _check_layout(a, pos, k)
  np.testing.assert_array_equal(a, selection.at_positions(mode, pos, k, seed=3))  # per seed
  # a position's selection does not depend on the call's shape (training rows vs eval rows)
  np.testing.assert_array_equal(selection.select(mode, 2, 100, 300, k, seed=3)[1], a[200:300])
  np.testing.assert_array_equal(selection.at_positions(mode, pos[[7, 250]], k, seed=3), a[[7, 250]])
  if mode != "window":
    b = selection.at_positions(mode, pos, k, seed=4)
    assert (a[k:] != np.asarray(b[k:])).any()  # another seed, another draw


def test_random_strata_and_local_part():
  k, p = 8, 999
  idx = np.asarray(selection.random(np.full(400, p), k, seed=0))  # the same row 400 times
  assert (idx == idx[0]).all()
  one = idx[0]
  m = p + 1
  for i, key in enumerate(one):  # one key in each of the k strata of [0, p]
    assert i * m // k <= key < (i + 1) * m // k
  loc = np.asarray(selection.random(np.asarray([p]), k, seed=0, n_local=3))[0]
  assert loc[-3:].tolist() == [p - 2, p - 1, p] and (loc[:-3] < p - 2).all()
  # over many positions each stratum is drawn uniformly: the mean offset in it is ~ half
  pos = np.arange(2000, 6000)
  r = np.asarray(selection.random(pos, k, seed=1))
  width = (pos[:, None] + 1) / k
  frac = (r - np.floor(np.arange(k)[None] * (pos[:, None] + 1) / k)) / width
  assert abs(frac.mean() - 0.5) < 0.02 and frac.min() >= 0 and frac.max() < 1


def test_modes_registry():
  for mode in selection.MODES:
    assert mode in mla.ATTENTION_MODES
    train.phase("dense", attention=mode)  # a valid phase: no indexer loss
    with pytest.raises(ValueError, match="takes no indexer loss"):
      mla.check_modes(mode, "dense")


def _tiny(topk):
  cfg = dsa_jax.preset(
    "test", n_layers=2, n_dense_layers=2, index_topk=topk, n_mtp_layers=0, attn_block_q=64
  )
  return cfg, model.build(cfg)


def test_mla_window_mode_matches_windowed_attention():
  cfg, m = _tiny(topk=8)
  blk = next(generate.blocks(m))
  t = 40
  x = jax.random.normal(jax.random.key(0), (2, t, cfg.dim))
  cos, sin = layers.rope_angles(cfg, jnp.arange(t)[None])
  out, _ = blk.attn(x, cos, sin, attention="window")
  pr = blk.attn.project(x, cos, sin)
  o_lat = _windowed_attention(pr.q_abs, pr.kv_lat, 8, cfg.softmax_scale, cfg.kv_lora_rank)
  np.testing.assert_allclose(out, blk.attn.out_from_latent(o_lat), atol=1e-5, rtol=1e-4)


def test_positional_modes_with_full_budget_are_dense():
  """k >= L: every positional mode is dense attention; the recall of S_t is then 1."""
  _, m = _tiny(topk=32)
  tok = jax.random.randint(jax.random.key(1), (1, 32), 0, 256)
  ref, _ = m(tok, attention="dense_mqa")
  for mode in ("window", "random"):
    got, aux = m(tok, attention=mode, metrics=True)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(aux["indexer_recall"], 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------ data
def test_eval_rows_place_pairs_at_bucket_distances():
  edges = retrieval_data.bucket_edges(512, 32)
  assert edges == (8, 16, 32, 64, 128, 256, 510)
  assert retrieval_data.bucket_edges(8192, 512) == (128, 256, 512, 1024, 2048, 4096, 8190)
  b = retrieval_data.eval_batch(512, edges, rows=3, n_pairs=24, seed=5)
  again = retrieval_data.eval_batch(512, edges, rows=3, n_pairs=24, seed=5)
  other = retrieval_data.eval_batch(512, edges, rows=3, n_pairs=24, seed=6)
  for k in b:
    np.testing.assert_array_equal(b[k], again[k])  # deterministic per seed
  assert (b["tokens"] != other["tokens"]).any()
  for r in range(3):
    toks, mask = b["tokens"][r], b["answer_mask"][r]
    assert (toks >= retrieval_data.KEY_BASE).sum() == 48 and mask.sum() == 24  # keys only there
    for i in range(24):
      q, v, p, d, bk = (
        b[k][r, i] for k in ("query_pos", "value_pos", "pair_pos", "distance", "bucket")
      )
      assert q - v == d and edges[bk] <= d < edges[bk + 1] and bk == i % 6
      assert v == p + 1 and toks[p] == toks[q] >= retrieval_data.KEY_BASE  # the query's key
      assert (toks == toks[q]).sum() == 2  # once in the pair, once in the query
      assert toks[v] == toks[q + 1] and mask[q + 1] == 1  # the answer is the pair's value
      assert toks[v] in retrieval_data.VALUES


def test_training_rows_source():
  cfg = data.DataConfig(
    source="retrieval", seq_len=512, batch_size=3, mqar_pairs=10, retrieval_text_weight=0.1
  )
  a, b = data.batch(cfg, 7), data.batch(cfg, 7)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert (data.batch(cfg, 8)["tokens"] != a["tokens"]).any()
  m = a["loss_mask"]
  assert ((m == 1.0).sum(1) == 10).all()  # one answer byte per query
  np.testing.assert_allclose(np.unique(m), [0.0, 0.1, 1.0], rtol=1e-6)
  d = retrieval_data.train_distances(np.random.default_rng(0), 8192, 20000, 8, 0)
  assert d.min() >= 8 and d.max() <= retrieval_data.max_distance(8192)
  assert 0.4 < np.mean(np.log(d) < (np.log(8) + np.log(8190)) / 2) < 0.6  # log-uniform
  with pytest.raises(ValueError, match="retrieval_min_distance"):
    data.DataConfig(source="retrieval", retrieval_min_distance=2)


def test_packed_rows_answer_every_query_from_its_pair():
  rng = np.random.default_rng(3)
  for seq_len, pairs, keys, values in [(64, 8, 8, 8), (256, 32, 128, 0), (65, 1, 1, 1)]:
    toks, mask = retrieval_data.packed_row(rng, seq_len, pairs, keys, values)
    assert toks.shape == mask.shape == (seq_len,)
    n_seg = seq_len // 2
    pair_val = {}
    for s_ in range(n_seg):
      k, v = int(toks[2 * s_]), int(toks[2 * s_ + 1])
      assert retrieval_data.KEY_BASE <= k < retrieval_data.KEY_BASE + keys
      assert v in retrieval_data.VALUES[: values or len(retrieval_data.VALUES)]
      assert mask[2 * s_] == 0
      if k in pair_val:  # a query: scored, and answered by its pair's value
        assert mask[2 * s_ + 1] == 1 and v == pair_val[k]
      else:  # the pair: not scored
        assert mask[2 * s_ + 1] == 0
        pair_val[k] = v
    assert len(pair_val) == pairs and mask.sum() == n_seg - pairs
    assert (mask[2 * n_seg :] == 0).all()
  with pytest.raises(ValueError, match="n_pairs"):
    retrieval_data.packed_row(rng, 64, 9, n_keys=8)
  cfg = data.DataConfig(
    source="retrieval_packed",
    seq_len=64,
    batch_size=4,
    mqar_pairs=8,
    retrieval_keys=8,
    retrieval_values=4,
  )
  b = data.batch(cfg, 0)
  np.testing.assert_array_equal(b["tokens"], data.batch(cfg, 0)["tokens"])
  with pytest.raises(ValueError, match="retrieval_keys"):
    data.DataConfig(source="retrieval_packed", retrieval_keys=-1)
  assert ((b["loss_mask"] == 1).sum(1) == 24).all()
  assert set(np.unique(b["tokens"][:, 0::2])) <= set(range(128, 136))
  assert set(np.unique(b["tokens"][:, 1::2])) <= set(retrieval_data.VALUES[:4].tolist())


# ------------------------------------------------------------------------------------- launcher
@pytest.fixture(scope="module")
def launcher(load_launcher):
  from experiments.configs import retrieval as cfg_mod

  retrieval = load_launcher("retrieval")
  c = cfg_mod.get_config("size=cpu")
  c.unlock()
  c.model.index_topk = 16
  c.eval.probes = 4
  return retrieval, c


def test_analyse_hits_of_window_and_indexer(launcher):
  """The eval's S_t at the query rows: a window holds the needed key iff distance < k; the
  indexer's top-k rows are the reference top-k at those positions."""
  retrieval, c = launcher
  m = model.build(retrieval.model_cfg(c))
  rows = retrieval.eval_rows(c, 2)
  res = retrieval.analyse_rows(m, "window", rows, batch=2)
  d = rows["distance"][:, None]  # [R,1,N] against hit [R,layers,N]
  np.testing.assert_array_equal(res["hit_value"], np.broadcast_to(d < 16, res["hit_value"].shape))
  assert ((res["recall_query"] >= 0) & (res["recall_query"] <= 1 + 1e-5)).all()
  assert res["correct"].shape == rows["distance"].shape and np.isfinite(res["nll"]).all()
  sp = retrieval.analyse_rows(m, "sparse", rows, batch=2)
  assert ((sp["recall_probe"] > 0) & (sp["recall_probe"] <= 1 + 1e-5)).all()
  # the ceiling holds every selection's recall and is reached exactly when k covers the prefix
  for r in (res, sp):
    assert (r["best_recall_probe"] >= r["recall_probe"] - 1e-5).all()
    assert (r["best_recall_query"] >= r["recall_query"] - 1e-5).all()
  # the warm-up's loss at the probes: a KL, >= 0, finite for the indexer; none for a window
  assert np.isnan(res["indexer_kl_probe"]).all()
  assert np.isfinite(sp["indexer_kl_probe"]).all() and (sp["indexer_kl_probe"] >= -1e-5).all()
  near = dict(rows, probe_pos=np.broadcast_to([5, 15, 100, c.seq_len - 1], (2, 4)).copy())
  best = retrieval.analyse_rows(m, "sparse", near, batch=2)["best_recall_probe"]  # [R,layers,4]
  np.testing.assert_allclose(best[..., :2], 1, atol=1e-5)  # k = 16 keys cover positions 0..15
  assert (best[..., 2:] < 1 - 1e-4).all()  # farther on, 16 keys miss some of the mass


def test_curriculum_chain(launcher, tmp_path):
  """pack -> widen -> short -> pretrain: each stage starts from the one before; a stage with 0
  steps is skipped and the next starts from the one before it."""
  retrieval, c = launcher
  c = c.copy_and_resolve_references()
  c.short.steps = 3
  assert retrieval.plan(c, "pack")[2] is None and retrieval.plan(c, "widen")[2] == "pack"
  assert retrieval.plan(c, "short")[2] == "widen" and retrieval.plan(c, "pretrain")[2] == "short"
  cfg = retrieval.stage_config(c, "pack", str(tmp_path))
  assert cfg.data.source == "retrieval_packed" and cfg.data.retrieval_keys == c.pack.n_keys == 8
  assert cfg.data.seq_len == c.pack.seq_len and cfg.optim.lr == c.lr.pack
  wc = retrieval.stage_config(c, "widen", str(tmp_path))
  assert wc.data.source == "retrieval_packed" and wc.ckpt.init_from == str(tmp_path / "pack")
  # the whole alphabet: 0 keys / values means all of them
  assert wc.data.retrieval_keys == wc.data.retrieval_values == 0 and wc.optim.lr == c.lr.widen
  assert wc.data.seed != cfg.data.seed
  assert retrieval.stage_config(c, "short", str(tmp_path)).ckpt.init_from == str(tmp_path / "widen")
  sc = retrieval.stage_config(c, "pretrain", str(tmp_path))
  assert sc.data.source == "retrieval" and sc.data.retrieval_keys == 0
  c.short.steps = 0
  assert retrieval.plan(c, "pretrain")[2] == "widen"
  c.widen.steps = 0
  assert retrieval.plan(c, "pretrain")[2] == "pack" and retrieval.plan(c, "short")[2] == "pack"
  assert retrieval.run_stage(c, "widen", str(tmp_path)) is None  # skipped, nothing trained
  c.pack.steps = 0
  assert retrieval.plan(c, "pretrain")[2] is None


def test_branch_steps(launcher, tmp_path):
  """The controls train `steps.branch` steps, DSA `warmup` (indexer only) then `sparse`; a config
  without `branch` gives the controls warmup + sparse."""
  retrieval, c = launcher
  c = c.copy_and_resolve_references()
  c.steps.warmup, c.steps.sparse, c.steps.branch = 5, 7, 9
  for stage in ("dense", "window", "random", "frozen_indexer"):
    assert retrieval.stage_steps(c, stage) == 9
    assert retrieval.stage_config(c, stage, str(tmp_path)).optim.total_steps == 9
  assert retrieval.stage_steps(c, "warmup") == 5 and retrieval.stage_steps(c, "dsa") == 7
  del c.steps["branch"]
  assert retrieval.stage_steps(c, "window") == 12


@pytest.mark.parametrize("stage", ["pack", "widen"])
def test_packed_stage_stops_early_once_solved(launcher, tmp_path, monkeypatch, stage):
  """pack / widen with stop_loss: trains in chunks of pack.chunk steps (each call continues the run to a
  higher step), stops after the first chunk whose training loss is below stop_loss, records why,
  and a rerun keeps that record; a loss never below stop_loss runs every step. Training itself is
  stood in for (the chain test runs it): losses 1.0, 0.1, 0.001, ... per chunk."""
  retrieval, c = launcher
  c = c.copy_and_resolve_references()
  c[stage].steps, c[stage].chunk, c[stage].stop_loss = 10, 3, 0.05
  calls = []

  def fake_train(cfg, wd, key):
    assert key == stage and wd.endswith(stage) and cfg.data.source == "retrieval_packed"
    calls.append(cfg.steps)
    return {"step": cfg.steps, "train": {"lm_loss": 10.0 ** -len(calls)}}

  monkeypatch.setattr(retrieval, "_train", fake_train)
  done = retrieval.run_stage(c, stage, str(tmp_path))
  assert calls == [3, 6] and done["steps"] == 6 and done["stopped"].startswith("lm_loss")
  assert retrieval.run_stage(c, stage, str(tmp_path))["steps"] == 6 and calls == [3, 6]
  calls.clear()
  c[stage].stop_loss = 1e-30
  (tmp_path / "full").mkdir()
  full = retrieval.run_stage(c, stage, str(tmp_path / "full"))
  assert calls == [3, 6, 9, 10] and full["steps"] == 10 and "stopped" not in full


def test_branches_subset(launcher, tmp_path, capsys):
  """config.branches leaves controls out (skipped stages train nothing); the criterion's three
  stay required and a bad list names itself."""
  retrieval, c = launcher
  assert retrieval.branches(c) == retrieval.BRANCHES
  c = c.copy_and_resolve_references()
  c.branches = "window, dsa,dense"
  assert retrieval.branches(c) == ("dense", "dsa", "window")
  for stage in ("random", "frozen_indexer"):
    assert retrieval.run_stage(c, stage, str(tmp_path)) is None
    assert f"[{stage}] not in config.branches" in capsys.readouterr().out
  assert not list(tmp_path.iterdir())
  for bad in ("dense,dsa", "dense,dsa,window,sliding"):
    c.branches = bad
    with pytest.raises(ValueError, match="config.branches="):
      retrieval.branches(c)


def test_criterion_reads_the_buckets(launcher):
  retrieval, _ = launcher
  edges = [8, 16, 32, 64, 128, 250]
  acc = lambda vals: [
    {"distance_lo": lo, "distance_hi": hi, "accuracy": a, "n": 10}
    for lo, hi, a in zip(edges[:-1], edges[1:], vals)
  ]
  ev = {
    "dense": {"accuracy": acc([1, 1, 0.95, 0.95, 0.9])},
    "dsa": {
      "accuracy": acc([1, 1, 0.9, 0.9, 0.85]),
      "hit_value_any_layer_by_bucket": [1, 1, 1, 0.95, 0.9],
      "recall_probe_per_layer": [0.95, 0.91],
    },
    "window": {"accuracy": acc([1, 0.5, 0.04, 0.03, 0.01])},
  }
  cr = retrieval.criterion(ev, topk=16, n_layers=2)
  assert cr["dense_ok"] and cr["recall_ok"] and cr["hit_ok"] and cr["window_at_chance"]
  # beyond k = 16: the buckets from 16 on; out of a 2-layer window's reach: from 32 on
  assert len(cr["dsa_over_dense_beyond_k"]) == 4 and cr["window_beyond_reach"] == [0.04, 0.03, 0.01]
  assert cr["dsa_ok"]  # 0.85 / 0.9 = 0.944 >= 0.9
  assert cr["warmup_recall_per_layer"] is None  # an eval.json written before the warmup row
  assert cr["dsa_best_recall_per_layer"] is None  # an eval.json written before the ceiling
  ev["warmup"] = {"recall_probe_per_layer": [0.97, 0.99], "best_recall_probe_per_layer": [1, 1]}
  ev["dsa"]["best_recall_probe_per_layer"] = [0.96, 0.93]
  cr = retrieval.criterion(ev, topk=16, n_layers=2)
  assert cr["warmup_recall_per_layer"] == [0.97, 0.99] and cr["warmup_best_recall_per_layer"] == [
    1,
    1,
  ]
  assert cr["dsa_best_recall_per_layer"] == [0.96, 0.93]


def _run(wd, res, stage="all"):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.retrieval",
      "--config=experiments/configs/retrieval.py:size=cpu",
      f"--workdir={wd}",
      f"--stage={stage}",
      f"--results={res}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )


@pytest.mark.slow
def test_retrieval_all_stages_cpu(tmp_path):
  wd, res = tmp_path / "wd", tmp_path / "results"
  out = _run(wd, res)
  assert out.returncode == 0, out.stderr[-3000:]
  rep = json.loads((res / "retrieval_cpu.json").read_text())
  assert rep["topk"] == 32 and rep["seq_len"] == 256 and rep["device"] and rep["commit"]
  nb = len(rep["buckets"]) - 1
  assert len(rep["results"]) == 5 * nb
  assert {r["branch"] for r in rep["results"]} == set(
    ("dense", "dsa", "window", "random", "frozen_indexer")
  )
  for r in rep["results"]:
    assert 0 <= r["accuracy"] <= 1 and r["n"] > 0 and r["distance_lo"] < r["distance_hi"]
  tok = {b: v["tokens"] for b, v in rep["branches"].items()}
  assert len(set(tok.values())) == 1  # equal tokens for every branch
  for b, v in rep["branches"].items():
    assert len(v["recall_probe_per_layer"]) == 2 and np.isfinite(v["text_loss"])
    assert all(
      x >= r - 1e-5 for x, r in zip(v["best_recall_probe_per_layer"], v["recall_probe_per_layer"])
    )
    assert (v["indexer_kl_probe_per_layer"] is None) == (b in ("window", "random"))
    assert len(v["hit_value_any_layer_by_bucket"]) == nb
  # the window's S_t holds the needed key exactly below k
  hv = rep["branches"]["window"]["hit_value_any_layer_by_bucket"]
  assert hv == [1.0 if hi <= 32 else 0.0 for hi in rep["buckets"][1:]]
  assert rep["pretrain_gate"]["done"] and set(rep["criterion"]) >= {"dense_ok", "dsa_ok"}
  assert rep["warmup"]["attention"] == "dense" and rep["warmup"]["selection"] == "indexer"
  assert len(rep["criterion"]["warmup_recall_per_layer"]) == 2
  assert (res / "retrieval_cpu.png").exists()
  assert json.loads((wd / "stage_widen.json").read_text())["steps"] == 2  # the curriculum ran it
  # finished stages re-run without training more (the pretrain gate log, the checkpoints)
  again = _run(wd, res, stage="pretrain")
  assert again.returncode == 0 and "done at step 4" in again.stdout, again.stderr[-3000:]
  again = _run(wd, res, stage="window")
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads((wd / "stage_window.json").read_text())["steps"] == 3


def test_branches_refuse_a_dense_model_that_did_not_learn(launcher, tmp_path, monkeypatch):
  """With pretrain.require > 0 a branch stage stops with one clear line when the gate log's last
  held-out accuracy misses it in some bucket, and trains once every bucket reaches it."""
  retrieval, c = launcher
  c = c.copy_and_resolve_references()
  c.pretrain.require = 0.9
  log = {"chunks": [{"step": 4, "accuracy": [1.0, 0.95, 0.4]}], "done": "max_steps 4"}
  (tmp_path / "pretrain_gate.json").write_text(json.dumps(log))
  trained = []
  monkeypatch.setattr(retrieval, "_train", lambda cfg, wd, key: trained.append(key) or {})
  monkeypatch.setattr(retrieval, "_record", lambda *a, **k: {})
  for stage in ("dense", "warmup", "window", "frozen_indexer"):
    with pytest.raises(SystemExit, match=r"worst held-out bucket is 0\.400 < pretrain.require"):
      retrieval.run_stage(c, stage, str(tmp_path))
  assert trained == []
  log["chunks"][-1]["accuracy"] = [1.0, 0.95, 0.9]
  (tmp_path / "pretrain_gate.json").write_text(json.dumps(log))
  retrieval.run_stage(c, "dense", str(tmp_path))
  assert trained == ["dense"]
