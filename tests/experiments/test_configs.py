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
  "v4": ["phase=warmup,size=test"],
}
# configs of multi-stage pipelines, not of one train run: their own tests run them
PIPELINES = {
  "reproduce": "tests/experiments/test_reproduce.py",
  "retrieval": "tests/experiments/test_retrieval.py",
}


def test_every_config_file_is_covered():
  assert set(FILES) == set(ARGS) | set(PIPELINES), FILES


@pytest.mark.parametrize("size", ["h200", "cpu"])
def test_reproduce_config_sizes_are_valid(size):
  from dsa_jax import config as model_config  # noqa: PLC0415
  from experiments.configs import reproduce  # noqa: PLC0415

  c = reproduce.get_config(f"size={size}")
  m = model_config.ModelConfig(**{k: v for k, v in dict(c.model).items() if k != "preset"})
  assert c.seq_len <= m.max_seq_len and m.index_topk <= c.seq_len // 8  # the protocol's k <= L/8
  assert c.eval.buckets[-1] >= c.seq_len and max(c.eval.passkey_distances) < c.seq_len
  with pytest.raises(ValueError, match="size"):
    reproduce.get_config("size=huge")
  with pytest.raises(ValueError, match="unknown"):
    reproduce.get_config("sise=cpu")


# dsa's warm-up runs in the slow set (CI time): the train tests and the demo run that phase
_SLOW_ARGS = {("dsa", "phase=warmup,size=test")}


@pytest.mark.parametrize(
  "name,arg",
  [
    pytest.param(n, a, marks=pytest.mark.slow) if (n, a) in _SLOW_ARGS else (n, a)
    for n in sorted(ARGS)
    for a in ARGS[n]
  ],
)
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


# The model dicts experiments/configs/reproduce.py and demo.py held before the sizes moved to
# dsa_jax.config.PRESETS (2026-12-05): the presets must give identical ModelConfigs, so that the
# reproduction's and the demo's numbers still hold.
_REPRO = dict(
  vocab_size=256,
  n_dense_layers=1,
  n_shared_experts=1,
  n_activated_experts=2,
  param_dtype="float32",
)
OLD_MODELS = {
  "repro_h200": dict(
    _REPRO,
    dim=512,
    inter_dim=1536,
    moe_inter_dim=256,
    n_layers=6,
    n_heads=16,
    n_routed_experts=8,
    n_expert_groups=4,
    n_limited_groups=2,
    q_lora_rank=256,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    index_n_heads=64,
    index_head_dim=128,
    index_topk=2048,
    original_seq_len=16384,
    max_seq_len=16384,
    compute_dtype="bfloat16",
    attn_block_q=1024,
    remat=True,
    impl="pallas",
  ),
  "repro_cpu": dict(
    _REPRO,
    dim=64,
    inter_dim=192,
    moe_inter_dim=32,
    n_layers=2,
    n_heads=2,
    n_routed_experts=4,
    n_expert_groups=2,
    n_limited_groups=1,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    index_n_heads=4,
    index_head_dim=32,
    index_topk=64,
    original_seq_len=512,
    max_seq_len=512,
    compute_dtype="float32",
    attn_block_q=512,
    remat=False,
    impl="reference",
  ),
}
# demo.model_config(1024): the debug preset with these overrides
OLD_DEMO = dict(
  dim=64,
  n_layers=2,
  n_dense_layers=1,
  n_heads=2,
  inter_dim=192,
  moe_inter_dim=32,
  q_lora_rank=32,
  kv_lora_rank=32,
  qk_nope_head_dim=16,
  qk_rope_head_dim=16,
  v_head_dim=16,
  index_head_dim=32,
  index_topk=1024 // 8,
  attn_block_q=1024,
  max_seq_len=1024,
  original_seq_len=1024,
)


@pytest.mark.parametrize("size", ["h200", "cpu"])
def test_reproduction_and_demo_models_unchanged(size):
  from dsa_jax import config as model_config  # noqa: PLC0415
  from experiments.configs import reproduce  # noqa: PLC0415

  want = model_config.ModelConfig(**OLD_MODELS[f"repro_{size}"])
  assert model_config.preset(f"repro_{size}") == want
  # what experiments/reproduce.py's stage_config builds its ModelConfig from
  c = reproduce.get_config(f"size={size}")
  assert c.model.preset == f"repro_{size}"
  t = common.make_config("dense", c.model.preset, 1, model=dict(c.model), data_=dict(seq_len=64))
  got = common.to_train_config(t)
  assert got.model == want
  assert model_config.preset("demo") == model_config.preset("debug", **OLD_DEMO)


def test_every_model_field_is_overridable_from_the_command_line():
  import dataclasses  # noqa: PLC0415

  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  from dsa_jax import config as model_config  # noqa: PLC0415

  path = os.path.join(ROOT, "dsa.py")
  new = dict(dim=96, rope_factor=8.0, scale_fmt="ue8m0", remat=True, impl="pallas", init_std=0.01)
  fields = [f.name for f in dataclasses.fields(model_config.ModelConfig)]
  argv = ["x", f"--config={path}:phase=sparse,size=test"]
  argv += [f"--config.model.{k}={v}" for k, v in new.items()]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  c = fv.config
  assert set(fields) <= set(c.model), set(fields) - set(c.model)
  m = common.to_train_config(c).model
  assert all(getattr(m, k) == v for k, v in new.items())
  # the phase and the other sections are the library dataclasses' fields as well
  assert set(c.phase) == {f.name for f in dataclasses.fields(train.PhaseConfig)}
  assert "mtp_weight" in c.phase and "moe_capacity_factor" in c.model


@pytest.mark.parametrize("size", sorted(common.SIZES))
def test_launcher_sizes_convert(size):
  """Every launcher size converts to a TrainConfig (the run fields included: the long-context
  sizes chunk the cross-entropy) with its sequence within the model's max_seq_len."""
  for phase in ("dense", "warmup", "sparse"):
    cfg = common.to_train_config(common.base_config(phase, size))
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    assert cfg.loss_chunk == (8192 if cfg.data.seq_len > 8192 else 0)
  with pytest.raises(ValueError, match="size"):
    common.base_config("dense", "huge")
