# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The README's main command at its smallest size: all three phases run and the report is complete."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


# A subprocess of three training phases (issue 20, item 7: end-to-end runs are `slow`; CI keeps
# tests/experiments/test_generate_cli.py as its end-to-end run).
@pytest.mark.slow
def test_demo_ci_size(tmp_path):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-m", "experiments.demo", f"--workdir={tmp_path}", "--size=ci"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())
  for k in (
    "dense_eval_loss",
    "dsa_eval_loss",
    "recall_after_warmup",
    "recall_after_sparse",
    "retrieval_accuracy",
    "index_topk",
    "seq_len",
  ):
    assert k in report, k
  assert report["seq_len"] >= 1024 and report["index_topk"] <= report["seq_len"] // 8
  assert set(report["retrieval_accuracy"]) == {"dense", "dsa"}
  assert 0.0 <= report["recall_after_sparse"] <= 1.0 + 1e-6
  assert (tmp_path / "report.png").exists()
  assert "DSA demo" in out.stdout
