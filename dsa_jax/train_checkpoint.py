# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Training checkpoints in a run's workdir (Orbax): the manager, save with per-array checksums,
verified restore with fallback to the previous kept step, and params-only starts (`init_from`).

A step directory holds three items: `params` (the full parameter tree, as a params checkpoint of
checkpoint.py), `opt` (optimizer state, RNG, step) and `meta` (JSON: step, phase, skipped-update
count and the checksum of every array). Nothing non-finite is ever saved; a restore verifies every
array (finite, equal to its checksum) and a bad step is moved to workdir/corrupt_checkpoints/.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as cm

from dsa_jax import checkpoint, model
from dsa_jax.config import ModelConfig
from dsa_jax.train_config import CheckpointCorrupt, NonFiniteError, RunError
from dsa_jax.trainer import Trainer, TrainState, layer_offset, named_leaves

log = logging.getLogger(__name__)


def manager(trainer: Trainer, workdir: str, protect: int | None = None):
  """The workdir's CheckpointManager: keeps the `ckpt.keep` newest steps and `protect` (the
  step this run was restored from and verified), so rotation never removes the last verified
  checkpoint."""
  keep = [cm.LatestN(n=trainer.cfg.ckpt.keep)]
  if protect is not None:
    keep.append(cm.CustomSteps(steps=[protect]))
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), "checkpoints"),
    item_handlers=_item_handlers(),
    options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=trainer.cfg.ckpt.async_save,
      preservation_policy=cm.AnyPreservationPolicy(keep),
    ),
  )


def _saved_trees(trainer: Trainer, state: TrainState) -> dict:
  """The two checkpoint items holding arrays, as saved."""
  return {
    "params": trainer.full_params(state),
    "opt": {"opt_state": state.opt_state, "rng": state.rng, "step": state.step},
  }


def save(
  trainer: Trainer, mgr, state: TrainState, force: bool = False, extra_meta: dict | None = None
):
  """Saves `state` with per-array checksums in its meta; raises NonFiniteError (and saves
  nothing) if any parameter or optimizer array is non-finite."""
  step = int(jax.device_get(state.step))
  trees = _saved_trees(trainer, state)
  sums = verify_finite(trees, trainer.cfg.model, f"step {step}", lambda m: NonFiniteError(m, step))
  meta = {
    "step": step,
    "data_position": step,
    "phase": trainer.cfg.phase.name,
    **(extra_meta or {}),
    "checksums": sums,
  }
  mgr.save(
    step,
    args=ocp.args.Composite(
      params=ocp.args.StandardSave(trees["params"]),
      opt=ocp.args.StandardSave(trees["opt"]),
      meta=ocp.args.JsonSave(meta),
    ),
    force=force,
  )


def restore(trainer: Trainer, mgr, step: int) -> tuple[TrainState, dict]:
  """The state saved at `step`, verified: every array finite and equal to its checksum.

  Raises RunError if the checkpoint does not fit this model, CheckpointCorrupt if it is
  unreadable, non-finite or fails its checksums. Returns (state, the step's meta).
  """
  # Abstract targets carry this trainer's shardings: Orbax reads each shard straight onto the
  # target mesh, so a checkpoint written on one mesh restores on any other.
  abs_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    jax.eval_shape(trainer.init_state_abstract),
    trainer.state_shardings,
  )
  abs_params = trainer.full_params(abs_state)
  where = f"checkpoint step {step} in {mgr.directory}"
  pmeta = _params_meta(mgr, step)
  if pmeta is not None:
    try:
      checkpoint.check_tree(pmeta, abs_params, where)
    except ValueError as e:
      raise RunError(str(e)) from None
  try:
    r = mgr.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abs_params),
        opt=ocp.args.StandardRestore(
          {"opt_state": abs_state.opt_state, "rng": abs_state.rng, "step": abs_state.step}
        ),
        meta=ocp.args.JsonRestore(),
      ),
    )
  except Exception as e:  # noqa: BLE001 - any read failure: this step is unusable
    raise CheckpointCorrupt(f"{where} could not be restored: {checkpoint.short_error(e)}") from e
  meta = r["meta"] if isinstance(r["meta"], dict) else {}
  trees = {"params": r["params"], "opt": r["opt"]}
  verify_finite(trees, trainer.cfg.model, where, CheckpointCorrupt, meta.get("checksums"))
  m = trainer.merge(*trainer.abstract_split())
  st = nnx.state(m)
  nnx.replace_by_pure_dict(st, r["params"])
  nnx.update(m, st)
  params, rest = trainer.split(m)
  state = TrainState(
    step=jnp.asarray(r["opt"]["step"]),
    params=jax.device_put(params, trainer.param_shardings),
    rest=jax.device_put(rest, trainer.rest_shardings),
    opt_state=r["opt"]["opt_state"],
    rng=r["opt"]["rng"],
  )
  return state, meta


def restore_latest_good(trainer: Trainer, mgr, workdir: str) -> tuple[TrainState, int, dict]:
  """Restores the newest step that verifies; a bad newer step is moved to
  workdir/corrupt_checkpoints/ with a warning. Returns (state, step, meta); RunError when no
  step is good."""
  bad = []
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      state, meta = restore(trainer, mgr, step)
    except CheckpointCorrupt as e:
      log.warning("%s; trying the previous kept step", e)
      bad.append((step, str(e)))
      continue
    for b, _ in bad:
      dst = os.path.join(workdir, "corrupt_checkpoints", str(b))
      while os.path.exists(dst):
        dst += "_"
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(os.path.join(str(mgr.directory), str(b)), dst)
      log.warning("checkpoint step %d moved to %s; resuming from step %d", b, dst, step)
    return state, step, meta
  raise RunError(
    f"no usable checkpoint in {mgr.directory}: "
    + "; ".join(m for _, m in bad)
    + " (move the workdir aside to start over)"
  )


def verify_finite(trees, cfg: ModelConfig, where: str, error, expected: dict | None = None):
  """{array name: checksum} of `trees`; raises error(message) naming the first array (and layer)
  whose checksum differs from `expected` or that holds a non-finite value."""
  named = named_leaves(trees)
  fin, sums = checkpoint.digest(x for _, x in named)
  got = {n: int(c) for (n, _), c in zip(named, sums)}
  if expected:
    diff = [n for n in got if n in expected and expected[n] != got[n]]
    if diff:
      more = f" (and {len(diff) - 1} more arrays)" if len(diff) > 1 else ""
      raise error(f"{where}: checksum mismatch in {diff[0]}{more}")
  if not np.all(fin):
    i = int(np.argmin(fin))
    name, x = named[i]
    raise error(f"{where}: non-finite values in {name}{bad_layer(cfg, name, x)}")
  return got


def bad_layer(cfg: ModelConfig, name: str, x) -> str:
  off = layer_offset(cfg, name)
  if off is None or np.ndim(x) < 1:
    return ""
  ok = jax.device_get(jax.jit(lambda a: jnp.all(jnp.isfinite(a), axis=tuple(range(1, a.ndim))))(x))
  return f" (layer {off + int(np.argmin(ok))})" if not np.all(ok) else ""


def _item_handlers():
  # Explicit handlers so item_metadata() can be read (and checked) before restoring.
  return {
    "params": ocp.StandardCheckpointHandler(),
    "opt": ocp.StandardCheckpointHandler(),
    "meta": ocp.JsonCheckpointHandler(),
  }


def _params_meta(mgr, step):
  """The params item's tree metadata as a nested dict (leaves have .shape), or None."""
  try:
    meta = mgr.item_metadata(step)
    p = meta["params"] if meta is not None else None
  except Exception:  # noqa: BLE001 - unreadable metadata is reported by the restore itself
    return None
  p = getattr(p, "tree", p)
  return p if isinstance(p, dict) else None


def _shape_dtype(tree):
  """Restore targets with the live arrays' shardings: a checkpoint written on another topology
  (e.g. 8 devices) then restores onto this process's devices instead of failing."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )


def load_init_params(path: str, cfg: ModelConfig) -> nnx.Module:
  """Params-only start: from a training workdir (latest step, or `workdir@step`) or a params
  checkpoint dir. The parameters are verified (finite; checksums where the step recorded them).
  Raises ValueError with one line naming the path and what is wrong."""
  step = None
  if "@" in os.path.basename(path):  # workdir@step picks a step other than the latest
    path, s = path.rsplit("@", 1)
    if not s.isdigit():
      raise ValueError(f"init_from={path}@{s}: the step after '@' must be an integer")
    step = int(s)
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"init_from={path} does not exist or is not a directory")
  ckpt_dir = os.path.join(path, "checkpoints")
  if not os.path.isdir(ckpt_dir) and not checkpoint.is_params_checkpoint(path):
    raise ValueError(
      f"init_from={path} is neither a training workdir (no checkpoints/) nor a params "
      "checkpoint (no _CHECKPOINT_METADATA)"
    )
  m = model.build(cfg)
  if not os.path.isdir(ckpt_dir):
    return checkpoint.load_params(path, m)
  mgr = ocp.CheckpointManager(ckpt_dir, item_handlers=_item_handlers())
  try:
    r, steps, step = _restore_params(mgr, path, ckpt_dir, step, m)
  finally:
    mgr.close()
  meta = r["meta"] if isinstance(r.get("meta"), dict) else {}
  sums = {k[len("params/") :]: v for k, v in meta.get("checksums", {}).items()}
  hint = f" (pass {path}@STEP to start from an earlier step of {sorted(steps)})"
  verify_finite(
    r["params"], cfg, f"init_from={path} step {step}", lambda msg: ValueError(msg + hint), sums
  )
  st = nnx.state(m)
  nnx.replace_by_pure_dict(st, r["params"])
  nnx.update(m, st)
  return m


def _restore_params(mgr, path: str, ckpt_dir: str, step: int | None, m: nnx.Module):
  """(restored params + meta items, the workdir's steps, the step read) for load_init_params."""
  steps = mgr.all_steps()
  if not steps:
    raise ValueError(f"init_from={path}: no checkpoint steps in {ckpt_dir}")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise ValueError(f"init_from={path}@{step}: step not found; available {sorted(steps)}")
  where = f"init_from={path} step {step}"
  want = nnx.to_pure_dict(nnx.state(m))
  pmeta = _params_meta(mgr, step)
  if pmeta is not None:
    checkpoint.check_tree(pmeta, want, where)
  abs_want = _shape_dtype(want)
  try:
    r = mgr.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abs_want), meta=ocp.args.JsonRestore()
      ),
    )
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"{where} could not be restored: {checkpoint.short_error(e)}") from e
  return r, steps, step


def restore_latest(trainer: Trainer, workdir: str) -> TrainState:
  """The full training state (params, optimizer, RNG, step) of the newest good checkpoint in
  `workdir`, verified, e.g. the final state of a finished run. RunError if there is none."""
  mgr = manager(trainer, workdir)
  try:
    if mgr.latest_step() is None:
      raise RunError(f"no checkpoint in {mgr.directory}")
    return restore_latest_good(trainer, mgr, os.path.abspath(workdir))[0]
  finally:
    mgr.close()


def saved_phase(mgr, step) -> str | None:
  """The phase name in a checkpoint's meta (None if unreadable: the restore reports that)."""
  try:
    with open(os.path.join(str(mgr.directory), str(step), "meta", "metadata")) as f:
      return json.load(f).get("phase")
  except (OSError, ValueError):
    return None


def remove_partial_saves(workdir: str):
  """Removes the temporary step directories a save killed midway leaves (call it only while
  holding the workdir's lock: another run's save in progress looks the same)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for d in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else ():
    if ".orbax-checkpoint-tmp" in d:
      shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
