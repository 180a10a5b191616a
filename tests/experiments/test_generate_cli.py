# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""`python -m experiments.generate` end to end: a training workdir in, JSON completions out."""

import json
import os
import subprocess
import sys

import dsa_jax
from dsa_jax import data, optim, train

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_generate_cli_from_training_workdir(tmp_path):
  """CI's end-to-end run (the demo, reproduction and notebook runs are `slow`): a one-layer model
  (quick to compile) trained one step, then decoded by the launcher in a subprocess."""
  mc = dsa_jax.preset("test", attn_block_q=64, n_layers=1, n_dense_layers=1, n_mtp_layers=0)
  cfg = train.TrainConfig(
    model=mc,
    phase=train.phase("dense"),
    optim=optim.OptimConfig(total_steps=1),
    data=data.DataConfig(source="text", seq_len=64, batch_size=2),
    ckpt=train.CkptConfig(async_save=False),
    steps=1,
    eval_metrics=False,
    progress=False,
  )
  train.train(cfg, str(tmp_path))
  assert json.loads((tmp_path / "model_config.json").read_text())["dim"] == mc.dim
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.generate",
      f"--ckpt={tmp_path}",
      "--prompt=def f(",
      "--prompt=x",
      "--max_new_tokens=4",
      "--fp8_cache",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [r["prompt"] for r in rows] == ["def f(", "x"]
  assert all(len(r["tokens"]) == 4 for r in rows)
