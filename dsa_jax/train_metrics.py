# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The host side of the training loop: metrics (metrics.jsonl, TensorBoard), the progress bar,
and the finiteness check of the fetched metrics.

Step metrics stay on device until a log or checkpoint step (`Monitor.check`): no host sync per
step. A resumed run first drops the rows a previous run wrote after its start step, so metrics
have one row per step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import jax
import numpy as np

from dsa_jax.train_config import NonFiniteError, TrainConfig
from dsa_jax.trainer import Trainer

log = logging.getLogger(__name__)


class Monitor:
  """The host side of the loop: metrics not yet looked at, logging, the skipped-update count."""

  def __init__(self, trainer, writer, bar, log_fn, skipped, tokens_per_step):
    self.trainer, self.writer, self.bar, self.log_fn = trainer, writer, bar, log_fn
    self.skipped, self.tokens_per_step = skipped, tokens_per_step
    self.pending = []  # (step, metrics) since the last check: device arrays, no sync per step
    self.last = {}
    self.t_last, self.steps_since = time.perf_counter(), 0

  def add(self, done: int, metrics):
    self.pending.append((done, metrics))
    self.steps_since += 1

  def check(self, done: int, mgr, write_row: bool):
    """Fetches the pending metrics; logs the newest row if `write_row`; raises NonFiniteError (after
    logging it) at the first non-finite loss or gradient under nan_policy="stop"."""
    if not self.pending:
      return
    rows, self.pending = jax.device_get(self.pending), []
    n_skipped = sum(int(m.get("skipped", 0)) for _, m in rows)
    if n_skipped:
      log.warning(
        "steps %d-%d: %d of %d updates skipped (non-finite loss or gradient)",
        rows[0][0],
        done,
        n_skipped,
        len(rows),
      )
    self.skipped += n_skipped
    bad = None
    if self.trainer.cfg.nan_policy == "stop":
      bad = first_nonfinite(self.trainer, rows)
    if write_row or bad:
      self.last = scalar(rows[-1][1])
      self.last["skipped"] = self.skipped
      dt = time.perf_counter() - self.t_last
      self.last["tokens_per_s"] = self.steps_since * self.tokens_per_step / max(dt, 1e-9)
      self.t_last, self.steps_since = time.perf_counter(), 0
      self.writer.scalars(done, self.last)
      if self.log_fn:
        self.log_fn(done, self.last)
      if self.bar is not None:
        self.bar.set_postfix(
          {k: f"{self.last[k]:.4g}" for k in ("loss", "grad_norm") if k in self.last}
        )
    if bad:
      mgr.wait_until_finished()
      kept = mgr.latest_step()
      kept = f"the last checkpoint, step {kept}, is finite" if kept else "nothing was saved"
      raise NonFiniteError(
        f"step {bad[0]}: non-finite {bad[1]}; stopped ({kept}; lower the lr, or "
        "nan_policy='skip' to skip such steps)",
        bad[0],
      )


_LOSS_ORDER = ("lm_loss", "indexer_kl", "mtp_loss", "loss", "grad_norm")


def first_nonfinite(trainer: Trainer, rows) -> tuple[int, str] | None:
  """(step, 'metric=value (where)') of the first non-finite loss or gradient in rows."""
  for step, m in rows:
    for k in _LOSS_ORDER:
      if k in m and not np.isfinite(m[k]):
        where = ""
        if k == "indexer_kl" and int(m.get("indexer_kl_nonfinite", -1)) >= 0:
          where = f" (layer {int(m['indexer_kl_nonfinite'])})"
        if k == "grad_norm" and int(m.get("grad_nonfinite", -1)) >= 0:
          name, layer = trainer.grad_slots[int(m["grad_nonfinite"])]
          where = f" (first in the gradient of {name}" + (
            f", layer {layer})" if layer is not None else ")"
          )
        return step, f"{k}={float(m[k])}{where}"
  return None


def scalar(d) -> dict:
  """The scalar metrics of `d` as floats (the non-finite markers left out)."""
  skip = ("grad_nonfinite", "indexer_kl_nonfinite")
  return {k: float(v) for k, v in d.items() if np.ndim(v) == 0 and k not in skip}


def progress_bar(cfg: TrainConfig, start: int):
  """A tqdm bar over the run's steps, or None when cfg.progress is off."""
  if not cfg.progress:
    return None
  import tqdm

  return tqdm.tqdm(total=cfg.steps, initial=start, desc=cfg.phase.name, dynamic_ncols=True)


class Writer:
  """metrics.jsonl always; TensorBoard scalars when tensorboardX is installed.

  A run starting at step `start` first drops the rows a previous run wrote after that step (and
  the final evaluation row when `start` == `final`: it is written again), so a resumed run's
  metrics have one row per step; TensorBoard purges its events after `start` likewise.
  """

  def __init__(self, workdir: str, enabled: bool = True, start: int = 0, final: int = 0):
    self.f = None
    self.tb = None
    if not enabled:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
      _truncate_rows(path, start, drop_eval_at=start if start == final else None)
    self.f = open(path, "a")
    try:
      import tensorboardX

      self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"), purge_step=start + 1)
    except ImportError:
      self.tb = None

  def scalars(self, step: int, d: dict):
    if self.f is None:
      return
    self.f.write(json.dumps({"step": step, **d}) + "\n")
    self.f.flush()
    if self.tb is not None:
      for k, v in d.items():
        if math.isfinite(v):  # tensorboardX warns on NaN; metrics.jsonl has the row
          self.tb.add_scalar(k, v, step)

  def close(self):
    if self.f is not None:
      self.f.close()
      self.f = None
    if self.tb is not None:
      self.tb.close()
      self.tb = None

  def close_on_error(self):
    """Closes the files if an exception is on its way out (no-op otherwise)."""
    if sys.exc_info()[0] is not None:
      self.close()


def _truncate_rows(path: str, start: int, drop_eval_at: int | None):
  """Rewrites metrics.jsonl without rows after `start` (atomically: temp file + rename)."""
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:  # a line cut by a kill: dropped
        continue
      step = row.get("step", 0)
      if step > start or (step == drop_eval_at and "eval_loss" in row):
        continue
      keep.append(line if line.endswith("\n") else line + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)
