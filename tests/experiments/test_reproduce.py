# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The reproduction pipeline (issue: reproduce the DSA claim) end to end at its CPU size."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dsa_jax import data

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_mqar_eval_rows_place_pairs_at_distance():
  toks, mask, dist = data.mqar_eval_batch(512, [0, 100, 300], per_distance=2, n_pairs=4)
  assert toks.shape == (6, 512) and mask.shape == (6, 512)
  for row, m, d in zip(toks, mask, dist):
    text = bytes(row.astype(np.uint8))
    q0 = 512 - 4 * 6  # the queries fill the tail, 6 bytes each
    ctx_end = text.rfind(b";\n", 0, q0) + 2
    assert q0 - ctx_end == d  # the gap between the last pair and the first query
    pairs = dict(
      p.split(b"=") for p in text[text.rfind(b"\n", 0, ctx_end - 2) + 1 : ctx_end - 2].split(b";")
    )
    for i in range(4):
      qk, qv = text[q0 + 6 * i : q0 + 6 * i + 2], text[q0 + 6 * i + 3 : q0 + 6 * i + 5]
      assert pairs[qk] == qv  # every query asks for a stored value
      assert m[q0 + 6 * i + 3] == m[q0 + 6 * i + 4] == 1.0
    assert m.sum() == 8


@pytest.mark.slow  # every stage in subprocesses (issue 20, item 7)
def test_reproduce_all_stages_cpu(tmp_path):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  wd, res = tmp_path / "wd", tmp_path / "results"
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.reproduce",
      "--config=experiments/configs/reproduce.py:size=cpu",
      f"--workdir={wd}",
      "--stage=all",
      f"--results={res}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rep = json.loads((res / "reproduction.json").read_text())
  steps = rep["config"]["steps"]
  tokens = rep["config"]["tokens"]
  # equal token budgets: branch A (dense) == warm-up + sparse
  assert tokens["dense"] == tokens["warmup"] + tokens["sparse"]
  assert tokens["pretrain"] == steps["pretrain"] * rep["config"]["seq_len"]
  for s in ("pretrain", "dense", "sparse"):
    e = rep["eval"][s]
    assert np.isfinite(e["loss_mean"]) and len(e["loss_by_position"]) == 3
    assert set(e["mqar"]) == {"16", "400"} and set(e["passkey_digit"]) == {"16", "400"}
  assert rep["eval"]["sparse"]["attention"] == "sparse"
  for k in ("before_warmup", "after_warmup", "after_sparse"):
    r = rep["indexer_recall_per_layer"][k]
    assert len(r) == 2 and all(0.0 <= x <= 1.0 + 1e-6 for x in r)
  assert all(v > 0 for v in rep["tokens_per_s"].values())
  assert (res / "reproduction.png").exists()
  for name in ("stage_pretrain", "stage_dense", "stage_warmup", "stage_sparse", "eval"):
    meta = json.loads((wd / f"{name}.json").read_text())
    assert meta["device"] and meta["commit"] and meta["date"], name  # every result says its origin
  # a finished stage re-run resumes at its last step and trains nothing more
  again = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.reproduce",
      "--config=experiments/configs/reproduce.py:size=cpu",
      f"--workdir={wd}",
      "--stage=warmup",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads((wd / "stage_warmup.json").read_text())["steps"] == steps["warmup"]
