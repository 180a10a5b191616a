# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""A run never silently loses or corrupts work: NaN guard, checkpoint integrity, config and resume
checks, workdir lock, metrics on resume, preemption, one-line errors.

The in-process runs share one compiled `Trainer` of a one-layer model (same model, phase, optim
and data; only steps / checkpointing / logging differ: `train(..., trainer=)`); one launcher run
is a subprocess.
"""

import dataclasses
import functools
import json
import logging
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import dsa_jax
from dsa_jax import data, optim, train, train_checkpoint
from dsa_jax.config import ModelConfig

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SEQ = 64
TINY = dict(n_layers=1, n_dense_layers=1, n_mtp_layers=0)  # quick to compile


def _configdict(steps=2, every=1, keep=3):
  """The launcher's config (dense_baseline, size=test) shrunk to one layer."""
  from experiments.configs import dense_baseline  # noqa: PLC0415

  c = dense_baseline.get_config("size=test")
  c.model.update(attn_block_q=SEQ, **TINY)
  c.data.source = "text"
  c.optim.update(lr=3e-3, warmup_steps=1, total_steps=20)
  c.ckpt.update(every=every, keep=keep, async_save=False)
  c.update(steps=steps, log_every=1, eval_batches=1, eval_metrics=False, progress=False)
  c.init = "host"
  return c


def _cfg(steps=2, every=1, keep=3, phase=None, batch_size=None, **kw):
  from experiments.configs import common  # noqa: PLC0415

  cfg = common.to_train_config(_configdict(steps, every, keep))
  if phase:
    kw["phase"] = train.phase(phase)
  if batch_size:
    kw["data"] = dataclasses.replace(cfg.data, batch_size=batch_size)
  return dataclasses.replace(cfg, **kw)


@functools.cache
def _trainer():
  return train.Trainer(_cfg())


def _train(cfg, wd, **kw):
  """train.train with the module's one compiled trainer where `cfg` allows it."""
  try:
    _trainer().reuse_for(cfg)
    kw["trainer"] = _trainer()
  except ValueError:  # another phase / batch / nan_policy: a trainer of its own
    pass
  return train.train(cfg, wd, **kw)


def _nan_mask_from(monkeypatch, first_bad_step):
  """Batches from `first_bad_step` on carry a NaN loss weight: the LM loss turns NaN."""
  real = data.batch

  def batch(cfg, step, **kw):
    b = real(cfg, step, **kw)
    if step + 1 >= first_bad_step and kw.get("split", "train") == "train":
      b = dict(b, loss_mask=b["loss_mask"].copy())
      b["loss_mask"][0, 1] = np.nan
    return b

  monkeypatch.setattr(train.data, "batch", batch)


def _steps(wd):
  return sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit())


# 1. finiteness guard ------------------------------------------------------------------------
def test_nan_stops_without_saving_it(tmp_path, monkeypatch):
  _nan_mask_from(monkeypatch, 3)
  wd = str(tmp_path / "run")
  with pytest.raises(train.NonFiniteError, match=r"^step 3: non-finite lm_loss=nan") as e:
    _train(_cfg(steps=5), wd)
  assert e.value.step == 3 and "\n" not in str(e.value)
  assert "last checkpoint, step 2, is finite" in str(e.value)
  assert _steps(wd) == [1, 2]  # nothing after the NaN was saved; the finite ones are kept


def test_nan_policy_skip_leaves_the_state_unchanged():
  tr = train.Trainer(_cfg(nan_policy="skip"))
  state = tr.init_state()
  state, m = tr.train_step(state, tr.put_batch(data.batch(tr.cfg.data, 0)))
  assert int(m["skipped"]) == 0
  before = [np.array(x) for x in jax.tree.leaves((state.params, state.rest, state.opt_state))]
  bad = data.batch(tr.cfg.data, 1)
  bad["loss_mask"][0, 1] = np.nan
  state, m = tr.train_step(state, tr.put_batch(bad))
  assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"])) and int(state.step) == 2
  after = jax.tree.leaves((state.params, state.rest, state.opt_state))
  assert all(np.array_equal(x, y) for x, y in zip(before, after))


def test_digest_is_the_same_on_host_and_device():
  from dsa_jax import checkpoint  # noqa: PLC0415

  r = np.random.default_rng(0)
  leaves = [
    jax.numpy.asarray(r.standard_normal((3, 5, 7)), "float32"),
    jax.numpy.asarray(r.standard_normal((4, 6)), "bfloat16"),
    jax.numpy.asarray(r.integers(0, 2**31, (5,)), "int32"),
    jax.numpy.asarray([1.0, np.inf]),
  ]
  fin, sums = checkpoint.digest(leaves)
  fin_d, sums_d = jax.device_get(checkpoint._digest_jit(leaves))
  assert fin.tolist() == fin_d.tolist() == [True, True, True, False]
  assert sums.tolist() == sums_d.tolist()
  leaves[0] = leaves[0].at[1, 2, 3].add(1.0)
  assert checkpoint.digest(leaves)[1][0] != sums[0]


# 2. checkpoint integrity ----------------------------------------------------------------------
def _corrupt_params(wd, step):
  """64 random bytes into the middle of every params data file of `step`."""
  root = os.path.join(wd, "checkpoints", str(step), "params")
  rng = np.random.default_rng(0)
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      if os.sep + "d" + os.sep in p + os.sep and os.path.getsize(p) > 256:
        with open(p, "r+b") as fh:
          fh.seek(os.path.getsize(p) // 2)
          fh.write(rng.bytes(64))


def test_corrupt_checkpoint_falls_back_and_keeps_verified(tmp_path, caplog):
  wd = str(tmp_path / "run")
  _train(_cfg(steps=2), wd)
  _corrupt_params(wd, 2)
  with caplog.at_level(logging.WARNING, logger="dsa_jax"):
    r = _train(_cfg(steps=4, keep=1), wd)
  assert r["step"] == 4
  assert any("checkpoint step 2" in m and "\n" not in m for m in caplog.messages)
  assert os.path.isdir(os.path.join(wd, "corrupt_checkpoints", "2"))
  assert _steps(wd) == [1, 4]  # keep=1, and step 1 (restored, verified) is never rotated out
  # a checksum that does not match is caught even when the bytes decode
  tr = _trainer()
  meta_path = os.path.join(wd, "checkpoints", "4", "meta", "metadata")
  meta = json.load(open(meta_path))
  name = sorted(k for k in meta["checksums"] if k.startswith("params/"))[0]
  meta["checksums"][name] ^= 1
  json.dump(meta, open(meta_path, "w"))
  mgr = train_checkpoint.manager(tr, wd)
  with pytest.raises(train.CheckpointCorrupt, match=f"checksum mismatch in {name}"):
    train_checkpoint.restore(tr, mgr, 4)
  mgr.close()
  # no good step left: one line, no training
  _corrupt_params(wd, 1)
  with pytest.raises(train.RunError, match="no usable checkpoint") as e:
    _train(_cfg(steps=5), wd)
  assert "\n" not in str(e.value)


# 3. validation and the LR schedule ------------------------------------------------------------
@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: train.CkptConfig(keep=0), "CkptConfig.keep=0 must be an integer >= 1"),
    (lambda: train.CkptConfig(every=0), "CkptConfig.every=0 must be an integer >= 1"),
    (lambda: _cfg(log_every=0), "TrainConfig.log_every=0"),
    (lambda: _cfg(eval_batches=0), "TrainConfig.eval_batches=0"),
    (lambda: _cfg(nan_policy="ignore"), "nan_policy='ignore'"),
    (
      lambda: train.TrainConfig(**{**_cfg().__dict__, "optim": optim.OptimConfig(lr=float("inf"))}),
      "OptimConfig.lr=inf must be a finite number > 0",
    ),
    (
      lambda: train.TrainConfig(
        **{**_cfg().__dict__, "optim": optim.OptimConfig(grad_clip=float("nan"))}
      ),
      "OptimConfig.grad_clip=nan",
    ),
  ],
)
def test_config_validation(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_lr_schedule_follows_steps():
  from experiments.configs import common, dsa  # noqa: PLC0415

  c = dsa.get_config("phase=sparse,size=test")
  c.steps = 400
  o = common.to_train_config(c).optim
  assert (o.total_steps, o.warmup_steps) == (400, 20)
  c.optim.total_steps, c.optim.warmup_steps = 1000, 5  # explicit: kept
  o = common.to_train_config(c).optim
  assert (o.total_steps, o.warmup_steps) == (1000, 5)


# 4. resume checks ---------------------------------------------------------------------------
def test_resume_refuses_changed_config(tmp_path):
  wd = str(tmp_path)
  _train(_cfg(steps=2), wd)
  with pytest.raises(train.RunError, match=r"data.batch_size: 2 -> 4") as e:
    _train(_cfg(steps=3, batch_size=4), wd)
  assert "\n" not in str(e.value)
  with pytest.raises(train.RunError, match=r"phase: 'dense' -> 'warmup'"):
    _train(_cfg(steps=3, phase="warmup"), wd)
  with pytest.raises(train.RunError, match="steps=1 is below step 2"):
    _train(_cfg(steps=1), wd)
  r = _train(_cfg(steps=3), wd)  # a longer run of the same config resumes
  assert r["step"] == 3
  runs = train.recorded_configs(wd)
  assert [os.path.basename(p) for p in runs] == ["config.0.json", "config.1.json"]
  assert json.load(open(runs[1]))["start_step"] == 2


# 5. lock, metrics on resume, preemption -------------------------------------------------------
def test_workdir_lock_and_stale_lock(tmp_path):
  wd = str(tmp_path)
  with train._WorkdirLock(wd):
    with pytest.raises(train.RunError, match=f"workdir {wd} is in use by pid {os.getpid()}"):
      _train(_cfg(steps=1), wd)
  # a lock file left by a killed run (no process holds it) does not block
  (tmp_path / ".lock").write_text("pid 999999 on elsewhere since 2026-01-01\n")
  assert _train(_cfg(steps=1), wd)["step"] == 1


def test_metrics_have_one_row_per_step_after_resume(tmp_path):
  wd = str(tmp_path)
  _train(_cfg(steps=4, every=2), wd)
  # as if killed after logging steps 3-4 but before their checkpoint was written
  import shutil  # noqa: PLC0415

  shutil.rmtree(tmp_path / "checkpoints" / "4")
  _train(_cfg(steps=4, every=2), wd)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  assert [r["step"] for r in rows if "eval_loss" in r] == [4]


def test_sigint_saves_like_sigterm(tmp_path):
  kill = lambda step, m: step == 2 and os.kill(os.getpid(), signal.SIGINT)
  r = _train(_cfg(steps=50, every=100), str(tmp_path), log_fn=kill)
  assert r["preempted"] and r["signal"] == "SIGINT" and r["step"] == 2
  assert _steps(str(tmp_path)) == [2]


def test_launcher_exit_codes(tmp_path, monkeypatch, capsys, load_launcher):
  launcher = load_launcher("train")

  # a real run through the launcher: SIGTERM after step 1 -> saved, exit 128 + 15
  real = data.batch
  kill = lambda cfg, step, **kw: (
    (step == 1 and os.kill(os.getpid(), signal.SIGTERM)) or real(cfg, step, **kw)
  )
  monkeypatch.setattr(train.data, "batch", kill)
  assert launcher.run(_configdict(steps=50, every=100), str(tmp_path)) == 128 + signal.SIGTERM
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
    "stopped by SIGTERM at step 2, saved; rerun the same command to resume"
  )
  assert _steps(str(tmp_path)) == [2]
  # user errors and a non-finite run: one line on stderr and their exit codes
  for error, code in [
    (train.NonFiniteError("step 3: non-finite lm_loss=nan; stopped", 3), launcher.EXIT_NONFINITE),
    (train.RunError("workdir /w is in use by pid 1"), launcher.EXIT_ERROR),
  ]:
    monkeypatch.setattr(train, "train", lambda *a, e=error, **k: (_ for _ in ()).throw(e))
    with pytest.raises(SystemExit) as e:
      launcher.run(_configdict(), "/unused")
    assert e.value.code == code
    assert capsys.readouterr().err == f"error: {error}\n"
  # Orbax / absl INFO logs are off unless --verbosity is given
  from absl import logging as absl_logging  # noqa: PLC0415

  before = absl_logging.get_verbosity()
  try:
    launcher._quiet_logs()
    assert absl_logging.get_verbosity() == absl_logging.WARNING
  finally:
    absl_logging.set_verbosity(before)


# 6. one-line messages -------------------------------------------------------------------------
def _launch(*args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "experiments.train", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_launcher_user_errors_are_one_line(tmp_path):
  cfg = "--config=experiments/configs/dense_baseline.py:size=test"
  cases = [
    ((cfg, "--config.x=1", f"--workdir={tmp_path}"), 1, "unknown config field(s) --config.x"),
    ((f"--workdir={tmp_path}",), 2, "error: --config is required"),
  ]
  for args, code, msg in cases:
    r = _launch(*args)
    assert r.returncode == code and msg in r.stderr, (args, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr


def test_library_messages(tmp_path, load_launcher):
  (tmp_path / "file").write_text("")
  with pytest.raises(train.RunError, match="is a file; expected a directory"):
    _train(_cfg(), str(tmp_path / "file"))
  # init_from an empty directory
  with pytest.raises(ValueError, match="neither a training workdir .* nor a params checkpoint"):
    train.load_init_params(str(tmp_path), dsa_jax.preset("test"))
  # an empty _METADATA: the step is reported unusable in one line, not a bare JSONDecodeError
  wd = str(tmp_path / "run")
  r = _train(_cfg(steps=1), wd)
  open(os.path.join(wd, "checkpoints", "1", "params", "_METADATA"), "w").close()
  assert r["step"] == 1
  tr, mgr = _trainer(), train_checkpoint.manager(_trainer(), wd)
  with pytest.raises(train.CheckpointCorrupt, match="checkpoint step 1 .* could not be restored"):
    train_checkpoint.restore(tr, mgr, 1)
  mgr.close()
  # a converter config without shape keys
  with open(os.path.join(ROOT, "tests", "goldens", "deepseek_v32_tiny", "config.json")) as f:
    hf = json.load(f)
  del hf["hidden_size"], hf["num_hidden_layers"]
  with pytest.raises(ValueError, match=r"missing required key\(s\) \['hidden_size', 'num_hi"):
    ModelConfig.from_hf_config(hf)
  # generate reads the model config a converted checkpoint recorded
  generate = load_launcher("generate")

  conv = tmp_path / "converted"
  (conv / "hf_source").mkdir(parents=True)
  want = dsa_jax.preset("test", dim=32)
  (conv / "hf_source" / "convert.json").write_text(json.dumps({"model_config": want.to_dict()}))
  assert generate.model_config(str(conv), "debug") == want


# 7. the demo says when it reuses a finished phase ---------------------------------------------
def test_finished_step(tmp_path):
  assert train.finished_step(str(tmp_path)) is None
  (tmp_path / "result.json").write_text(json.dumps({"step": 4, "preempted": False}))
  assert train.finished_step(str(tmp_path)) == 4
  (tmp_path / "result.json").write_text(json.dumps({"step": 2, "preempted": True}))
  assert train.finished_step(str(tmp_path)) is None
