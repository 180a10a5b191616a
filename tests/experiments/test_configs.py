# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Every experiment config file loads, converts and runs one step at size=test."""

import glob
import importlib
import os

import pytest

from dsa_jax import train
from experiments.configs import common

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs")
FILES = sorted(
  os.path.basename(f)[:-3]
  for f in glob.glob(os.path.join(ROOT, "*.py"))
  if not os.path.basename(f).startswith(("_", "common"))
)
ARGS = {
  "dsa": ["phase=warmup,size=test", "phase=sparse,size=test"],
  "dense_baseline": ["size=test"],
}
# configs of multi-stage pipelines, not of one train run: their own tests run them
PIPELINES = {"reproduce": "tests/experiments/test_reproduce.py"}


def test_every_config_file_is_covered():
  assert set(FILES) == set(ARGS) | set(PIPELINES), FILES


@pytest.mark.parametrize("size", ["h200", "cpu"])
def test_reproduce_config_sizes_are_valid(size):
  from dsa_jax import config as model_config  # noqa: PLC0415
  from experiments.configs import reproduce  # noqa: PLC0415

  c = reproduce.get_config(f"size={size}")
  m = model_config.ModelConfig(**dict(c.model))  # validates every field
  assert c.seq_len <= m.max_seq_len and m.index_topk <= c.seq_len // 8  # the protocol's k <= L/8
  assert c.eval.buckets[-1] >= c.seq_len and max(c.eval.passkey_distances) < c.seq_len
  with pytest.raises(ValueError, match="size"):
    reproduce.get_config("size=huge")
  with pytest.raises(ValueError, match="unknown"):
    reproduce.get_config("sise=cpu")


@pytest.mark.parametrize("name,arg", [(n, a) for n in sorted(ARGS) for a in ARGS[n]])
def test_config_runs_one_step(name, arg, tmp_path):
  mod = importlib.import_module(f"experiments.configs.{name}")
  c = mod.get_config(arg)
  c.progress = False
  c.ckpt.async_save = False
  c.eval_metrics = False
  cfg = common.to_train_config(c)
  assert cfg.steps == 1
  r = train.train(cfg, str(tmp_path))
  assert r["step"] == 1 and r["train"]["loss"] > 0


def test_bad_config_args():
  mod = importlib.import_module("experiments.configs.dsa")
  with pytest.raises(ValueError, match="unknown"):
    mod.get_config("phase=warmup,sise=test")
  with pytest.raises(ValueError, match="phase"):
    mod.get_config("phase=dense,size=test")
