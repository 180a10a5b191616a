# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""One training phase in a workdir (docs/dsa.md §Training): `train(cfg, workdir)` runs or resumes it.

The pieces, one module each (all re-exported here, so `train.TrainConfig`, `train.Trainer`, ...
keep working):
- train_config.py: `PhaseConfig` / `PHASES` / `phase`, `CkptConfig`, `TrainConfig`, the errors;
- trainer.py: `Trainer` (shardings, state init, the jitted `train_step` / `eval_step`);
- train_checkpoint.py: the Orbax manager, save with checksums, verified restore with fallback,
  `load_init_params` (ckpt.init_from);
- train_metrics.py: metrics.jsonl / TensorBoard, progress bar, the host-side finiteness check;
- this module: the loop, the workdir lock, preemption, resume checks, config records.

A run never silently loses or corrupts work: a non-finite loss, gradient or parameter stops it
(`NonFiniteError`, nothing non-finite is saved) or, with `nan_policy="skip"`, skips that update;
every checkpoint carries per-array checksums and is verified (checksums, finiteness) when
restored, falling back to the previous kept step; a resume with a different model, phase, batch
or sequence length is refused (`RunError`); one run at a time holds a workdir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time

import jax
import numpy as np

from dsa_jax import data
from dsa_jax import train_checkpoint as ckpt_io
from dsa_jax import train_metrics as metrics_io
from dsa_jax.config import REMOVED_FIELDS
from dsa_jax.train_checkpoint import load_init_params, restore_latest
from dsa_jax.train_config import (
  PHASES,
  CheckpointCorrupt,
  CkptConfig,
  NonFiniteError,
  PhaseConfig,
  RunError,
  TrainConfig,
  phase,
)
from dsa_jax.trainer import Trainer, TrainState

__all__ = [
  "PHASES",
  "CheckpointCorrupt",
  "CkptConfig",
  "NonFiniteError",
  "PhaseConfig",
  "RunError",
  "TrainConfig",
  "TrainState",
  "Trainer",
  "config_record",
  "finished_step",
  "load_init_params",
  "phase",
  "recorded_configs",
  "restore_latest",
  "resume_differences",
  "train",
]

log = logging.getLogger(__name__)


class _Preempted:
  """SIGTERM / SIGINT handler: the loop saves after the current step and returns. A second
  Ctrl-C stops at once (KeyboardInterrupt, nothing saved)."""

  def __init__(self):
    self.signum = None

  @property
  def flag(self) -> bool:
    return self.signum is not None

  def __call__(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt
    if signum == signal.SIGINT:
      print("\nSIGINT: saving after this step (Ctrl-C again to stop without saving)", flush=True)
    self.signum = signum


class _WorkdirLock:
  """An exclusive flock on workdir/.lock for the run. The kernel drops it when the process ends
  (even on kill -9), so a dead run never leaves a stale lock; the file's text only names the
  holder in the error. A file system without flock runs unlocked, with a warning."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self.f = None

  def __enter__(self):
    import fcntl

    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise RunError(
        f"workdir {os.path.dirname(self.path)} is in use by {holder}; wait for that run to end "
        "or use another workdir"
      ) from None
    except OSError as e:  # e.g. ENOLCK on some network file systems
      log.warning("workdir lock unavailable (%s): not protected against a second run", e)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}\n")
    f.flush()
    self.f = f
    return self

  def __exit__(self, *exc):
    import fcntl

    self.f.truncate(0)
    fcntl.flock(self.f, fcntl.LOCK_UN)
    self.f.close()


def finished_step(workdir: str) -> int | None:
  """The final step of a finished (not preempted) run in workdir, from its result.json."""
  path = os.path.join(workdir, "result.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    r = json.load(f)
  return None if r.get("preempted") else r.get("step")


# Free to change on resume: model fields that do not change the parameters or the math, and
# the fields removed from ModelConfig (which older records hold).
_RESUME_FREE_MODEL_FIELDS = (
  "impl",
  "attn_block_q",
  "remat",
  "remat_policy",
  "init_std",
) + REMOVED_FIELDS


def config_record(cfg: TrainConfig) -> dict:
  """The JSON-able record of `cfg` that workdir/config.<n>.json holds."""
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def recorded_configs(workdir: str) -> list[str]:
  """Paths of workdir/config.<n>.json in run order."""
  names = [f for f in os.listdir(workdir) if f.startswith("config.") and f.endswith(".json")]
  runs = sorted(int(f[7:-5]) for f in names if f[7:-5].isdigit())
  return [os.path.join(workdir, f"config.{n}.json") for n in runs]


def resume_differences(cfg: TrainConfig, workdir: str, saved_phase: str | None) -> list[str]:
  """What differs between `cfg` and the config that produced workdir's checkpoints: model
  (architecture and dtypes), phase, data batch_size and seq_len, as 'field: old -> new'."""
  now = config_record(cfg)
  runs = recorded_configs(workdir)
  if runs:
    with open(runs[-1]) as f:
      old = json.load(f)
  else:  # a workdir from before config.<n>.json: the model config and the saved phase name
    old = {}
    mpath = os.path.join(workdir, "model_config.json")
    if os.path.exists(mpath):
      with open(mpath) as f:
        old["model"] = json.load(f)
  diffs = []
  for k in sorted(set(old.get("model", {})) | set(now["model"])):
    if k not in _RESUME_FREE_MODEL_FIELDS and "model" in old:
      if old["model"].get(k) != now["model"].get(k):
        diffs.append(f"model.{k}: {old['model'].get(k)!r} -> {now['model'].get(k)!r}")
  if "phase" in old and old["phase"].get("name") != cfg.phase.name:
    diffs.append(f"phase: {old['phase'].get('name')!r} -> {cfg.phase.name!r}")
  elif "phase" in old:
    for k in sorted(set(old["phase"]) | set(now["phase"])):
      if old["phase"].get(k) != now["phase"].get(k):
        diffs.append(f"phase.{k}: {old['phase'].get(k)!r} -> {now['phase'].get(k)!r}")
  elif saved_phase is not None and saved_phase != cfg.phase.name:
    diffs.append(f"phase.name: {saved_phase!r} -> {cfg.phase.name!r}")
  for k in ("batch_size", "seq_len"):
    if "data" in old and old["data"].get(k) != now["data"][k]:
      diffs.append(f"data.{k}: {old['data'].get(k)!r} -> {now['data'][k]!r}")
  return diffs


def train(
  cfg: TrainConfig,
  workdir: str,
  *,
  trainer: Trainer | None = None,
  log_fn=None,
  allow_config_change: bool = False,
) -> dict:
  """Runs (or resumes) one phase in `workdir`; returns the final metrics and eval results.

  Resumes exactly from the latest good checkpoint in workdir (params, optimizer, RNG, data
  position); otherwise starts from `ckpt.init_from` params (fresh optimizer) or a fresh init.
  SIGTERM or SIGINT saves a checkpoint and returns with result["preempted"] and
  result["signal"]; on several processes SIGTERM goes through JAX's preemption service and
  Orbax's `reached_preemption`, so every process stops after the same step. Each run appends
  its config to workdir/config.<n>.json. The result (JSON-able, also workdir/result.json) holds
  "step", "train" (the last logged metrics), "preempted", "signal" and "eval"; the final state
  is the newest checkpoint (`restore_latest`).

  `trainer`: a `Trainer` to reuse (its compiled steps) for a config that differs only in
  steps, ckpt, logging or progress (`Trainer.reuse_for`); by default a new one is built.

  Raises:
    RunError: the workdir is a file or in use by another run; a resume with another model,
      phase, batch size or sequence length (unless allow_config_change), or with `steps` below
      the saved step; no checkpoint in workdir verifies.
    NonFiniteError: a non-finite loss, gradient or parameter (nan_policy="stop"); the
      checkpoints saved before it are finite and kept.
  """
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunError(f"workdir {workdir} is a file; expected a directory")
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0  # one writer (and lock holder) on a shared workdir
  lock = _WorkdirLock(workdir) if lead else None
  if lock is not None:
    lock.__enter__()
  # Installed before the (possibly long: sharded init compiles) start-up, so that a preemption
  # then is caught too: the first step runs, is saved, and train returns. Several processes: no
  # Python handler (it would replace JAX's preemption notifier and stop one process alone).
  preempted = _Preempted()
  old = {}
  if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
    for sig in (signal.SIGTERM, signal.SIGINT):
      old[sig] = signal.signal(sig, preempted)
  managers = []  # closed at the end: Orbax's threads would otherwise outlive the run
  try:
    trainer = trainer.reuse_for(cfg) if trainer is not None else Trainer(cfg)
    return _train_phase(trainer, workdir, lead, preempted, log_fn, allow_config_change, managers)
  finally:
    for m in managers:
      m.close()
    for sig, h in old.items():
      signal.signal(sig, h)
    if lock is not None:
      lock.__exit__(None, None, None)


def _train_phase(trainer, workdir, lead, preempted, log_fn, allow_config_change, managers) -> dict:
  cfg = trainer.cfg
  if lead:  # this run holds the lock: a tmp step directory is a save killed midway
    ckpt_io.remove_partial_saves(workdir)
  mgr = ckpt_io.manager(trainer, workdir)
  managers.append(mgr)
  latest = mgr.latest_step()
  skipped = 0
  if latest is not None:
    if cfg.steps < latest:
      raise RunError(
        f"steps={cfg.steps} is below step {latest} already saved in {workdir}; "
        "raise steps to continue, or use another workdir"
      )
    diffs = resume_differences(cfg, workdir, ckpt_io.saved_phase(mgr, latest))
    if diffs and not allow_config_change:
      raise RunError(
        f"workdir {workdir} was produced by another config: {'; '.join(diffs)} "
        "(use another workdir, or allow_config_change to resume anyway)"
      )
    if diffs:
      log.warning("resuming %s with a changed config: %s", workdir, "; ".join(diffs))
    state, step, meta = ckpt_io.restore_latest_good(trainer, mgr, workdir)
    skipped = int(meta.get("skipped", 0))
    mgr = ckpt_io.manager(trainer, workdir, protect=step)  # never rotate out the verified step
    managers.append(mgr)
  elif cfg.ckpt.init_from:
    state = trainer.init_state(load_init_params(cfg.ckpt.init_from, cfg.model))
  else:
    state = trainer.init_state()
  start = int(jax.device_get(state.step))
  if lead:
    # the model's resolved config: what generate/convert rebuild from; config.<n>.json: this run
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
      json.dump(cfg.model.to_dict(), f, indent=1)
    n = len(recorded_configs(workdir))
    with open(os.path.join(workdir, f"config.{n}.json"), "w") as f:
      json.dump({**config_record(cfg), "start_step": start}, f, indent=1)
  writer = metrics_io.Writer(workdir, enabled=lead, start=start, final=cfg.steps)
  bar = metrics_io.progress_bar(cfg, start)
  host, n_hosts = jax.process_index(), jax.process_count()
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  monitor = metrics_io.Monitor(trainer, writer, bar, log_fn, skipped, tokens_per_step)
  try:
    for step in range(start, cfg.steps):
      batch = trainer.put_batch(data.batch(cfg.data, step, host=host, n_hosts=n_hosts))
      state, metrics = trainer.train_step(state, batch)
      done = step + 1
      monitor.add(done, metrics)
      if done % cfg.log_every == 0 or done == cfg.steps:
        monitor.check(done, mgr, write_row=True)
      if bar is not None:
        bar.update(1)
      if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
        writer.scalars(done, metrics_io.scalar(trainer.evaluate(state)))
      # read once here: a signal during the save is handled after it. Several processes: the
      # preemption sync point of JAX's coordination service, the same step on every process.
      if n_hosts > 1 and mgr.reached_preemption(done):
        preempted.signum = signal.SIGTERM
      stop = preempted.flag
      if done % cfg.ckpt.every == 0 or done == cfg.steps or stop:
        monitor.check(done, mgr, write_row=False)  # every step's metrics are seen before a save
        force = done == cfg.steps or stop
        ckpt_io.save(trainer, mgr, state, force=force, extra_meta={"skipped": monitor.skipped})
      if stop:
        break
    mgr.wait_until_finished()
  finally:
    writer.close_on_error()
    if bar is not None:
      bar.close()
  sig = signal.Signals(preempted.signum).name if preempted.flag else None
  result = {
    "step": int(jax.device_get(state.step)),
    "train": monitor.last,
    "preempted": preempted.flag,
    "signal": sig,
  }
  if not preempted.flag:
    ev = trainer.evaluate(state)
    result["eval"] = {k: np.asarray(v).tolist() for k, v in ev.items()}
    writer.scalars(result["step"], metrics_io.scalar(ev))
  writer.close()
  if lead:
    with open(os.path.join(workdir, "result.json"), "w") as f:
      json.dump(result, f, indent=1)
  return result
