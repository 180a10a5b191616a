# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Two-phase DSA training (docs/dsa.md §Training): a pure `train_step`, `eval_step` and the loop.

A phase is data (docs/architecture.md §Configs): which attention runs, which indexer loss, which
parameters train (a regex over parameter paths), the loss weights. Each phase is its own run; a
later phase starts from an earlier one's parameters with `ckpt.init_from` (fresh optimizer).
- dense: dense attention, LM loss, everything but the indexer trains (the control).
- warmup: dense attention, dense KL only, only the indexer trains; optimizer state
  exists only for indexer parameters; every other parameter stays bit-identical.
- sparse: DSA attention, LM loss + sparse KL, everything trains; the indexer reads
  stop-gradient inputs, so the LM loss never reaches it and the KL never reaches the main model.

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
import math
import os
import shutil
import signal
import socket
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from dsa_jax import checkpoint, data, losses, mla, model, moe, optim, sharding
from dsa_jax.config import ModelConfig

log = logging.getLogger(__name__)


class RunError(ValueError):
  """A run cannot start or go on (workdir in use, refused resume, no usable checkpoint)."""


class CheckpointCorrupt(RunError):
  """A checkpoint step is unreadable, non-finite or fails its checksums."""


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss, gradient or parameter; nothing non-finite was saved."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def _check_number(where: str, name: str, v, lo=None, hi=None, lo_open=False, hi_open=False):
  """Raises ValueError unless v is a finite number within the bounds (open ends where asked)."""
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  rule = []
  if lo is not None:
    rule.append(f"> {lo}" if lo_open else f">= {lo}")
    ok = ok and (v > lo if lo_open else v >= lo)
  if hi is not None:
    rule.append(f"< {hi}" if hi_open else f"<= {hi}")
    ok = ok and (v < hi if hi_open else v <= hi)
  if not ok:
    raise ValueError(f"{where}.{name}={v!r} must be a finite number {' and '.join(rule)}".rstrip())


def _check_int(where: str, name: str, v, lo: int):
  if not isinstance(v, int) or isinstance(v, bool) or v < lo:
    raise ValueError(f"{where}.{name}={v!r} must be an integer >= {lo}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhaseConfig:
  name: str = "sparse"
  attention: str = "sparse"
  indexer_loss: str = "sparse"
  trainable: str = ".*"
  lm_weight: float = 1.0
  indexer_kl_weight: float = 1.0
  mtp_weight: float = 0.0
  router_bias_rate: float = 1e-3  # aux-loss-free balancing step (DeepSeek-V3 §2.1.2)

  def __post_init__(self):
    mla.check_modes(self.attention, self.indexer_loss, where="PhaseConfig.")
    for f in ("lm_weight", "indexer_kl_weight", "mtp_weight", "router_bias_rate"):
      _check_number("PhaseConfig", f, getattr(self, f), lo=0)
    optim.trainable_filter(self.trainable)  # validates the regex


PHASES = {
  "dense": dict(
    name="dense",
    attention="dense",
    indexer_loss="none",
    trainable=r"^(?!.*indexer)",
    lm_weight=1.0,
    indexer_kl_weight=0.0,
  ),
  "warmup": dict(
    name="warmup",
    attention="dense",
    indexer_loss="dense",
    trainable=r"indexer",
    lm_weight=0.0,
    indexer_kl_weight=1.0,
    router_bias_rate=0.0,
  ),
  "sparse": dict(
    name="sparse",
    attention="sparse",
    indexer_loss="sparse",
    trainable=r".*",
    lm_weight=1.0,
    indexer_kl_weight=1.0,
  ),
}


def phase(name: str, **overrides) -> PhaseConfig:
  if name not in PHASES:
    raise ValueError(f"unknown phase {name!r}; expected one of {sorted(PHASES)}")
  return PhaseConfig(**{**PHASES[name], **overrides})


@dataclasses.dataclass(frozen=True, kw_only=True)
class CkptConfig:
  every: int = 100  # save every this many steps (and at the end, and on SIGTERM / SIGINT)
  keep: int = 3  # newest checkpoints kept (the one this run resumed from is kept as well)
  async_save: bool = True
  init_from: str | None = None  # params-only start (a workdir or a params checkpoint dir)

  def __post_init__(self):
    _check_int("CkptConfig", "every", self.every, 1)
    _check_int("CkptConfig", "keep", self.keep, 1)
    if self.init_from is not None and not isinstance(self.init_from, str):
      raise ValueError(f"CkptConfig.init_from={self.init_from!r} must be a path or None")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  model: ModelConfig
  phase: PhaseConfig
  optim: optim.OptimConfig
  data: data.DataConfig
  ckpt: CkptConfig = CkptConfig()
  steps: int = 100
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0  # 0 = only at the end
  eval_batches: int = 2
  eval_metrics: bool = True  # indexer recall / top-k overlap at eval (costs a dense pass)
  mesh: tuple = (("data", -1),)
  rules: tuple | None = None  # overrides of sharding.DEFAULT_RULES as (name, mesh_axes) pairs
  progress: bool = True
  # "stop": a non-finite loss / gradient / parameter ends the run (NonFiniteError) without saving
  # it; "skip": such a step's update is skipped (params and optimizer unchanged), counted as
  # metrics["skipped"] and in the checkpoint's meta.
  nan_policy: str = "stop"
  # "host": numpy init of the full model on every host, then device_put (fast for small models);
  # "sharded": jitted jax.random init with out_shardings, each device makes only its shards (no
  # full copy anywhere); "auto": sharded when the mesh has more than one device or process.
  init: str = "auto"

  def __post_init__(self):
    _check_int("TrainConfig", "steps", self.steps, 1)
    _check_int("TrainConfig", "log_every", self.log_every, 1)
    _check_int("TrainConfig", "eval_every", self.eval_every, 0)
    _check_int("TrainConfig", "eval_batches", self.eval_batches, 1)
    if self.nan_policy not in ("stop", "skip"):
      raise ValueError(f"TrainConfig.nan_policy={self.nan_policy!r}; expected stop|skip")
    o = self.optim
    _check_number("OptimConfig", "lr", o.lr, lo=0, lo_open=True)
    _check_number("OptimConfig", "min_lr_ratio", o.min_lr_ratio, lo=0, hi=1)
    _check_number("OptimConfig", "b1", o.b1, lo=0, hi=1, hi_open=True)
    _check_number("OptimConfig", "b2", o.b2, lo=0, hi=1, hi_open=True)
    _check_number("OptimConfig", "weight_decay", o.weight_decay, lo=0)
    _check_number("OptimConfig", "grad_clip", o.grad_clip, lo=0, lo_open=True)
    _check_int("OptimConfig", "warmup_steps", o.warmup_steps, 0)
    _check_int("OptimConfig", "total_steps", o.total_steps, 1)
    if self.data.seq_len > self.model.max_seq_len:
      raise ValueError(
        f"DataConfig.seq_len={self.data.seq_len} exceeds ModelConfig.max_seq_len={self.model.max_seq_len}"
      )
    if self.model.vocab_size < 256:
      raise ValueError(f"ModelConfig.vocab_size={self.model.vocab_size} < 256 byte tokens")
    if self.init not in ("auto", "host", "sharded"):
      raise ValueError(f"TrainConfig.init={self.init!r}; expected auto|host|sharded")


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: nnx.State  # trainable parameters of this phase
  rest: nnx.State  # frozen parameters and router biases
  opt_state: Any
  rng: jax.Array


class Trainer:
  """Holds the static parts (graphdef, optimizer, mesh, jitted steps) of one phase."""

  def __init__(self, cfg: TrainConfig, mesh=None):
    self.cfg = cfg
    self.mesh = mesh or sharding.make_mesh(dict(cfg.mesh))
    self.rules = sharding.rules_from(cfg.rules)
    self.filter = optim.trainable_filter(cfg.phase.trainable)
    self.tx = optim.make_optimizer(cfg.optim)
    abstract = model.abstract(cfg.model)
    self.graphdef, abs_params, abs_rest = nnx.split(abstract, self.filter, ...)
    if not jax.tree.leaves(abs_params):
      raise ValueError(f"phase.trainable={cfg.phase.trainable!r} matches no parameter")
    # Layer-stacked parameters keep their layer axis in the gradient sums of squares, so that a
    # non-finite gradient is named by parameter and layer: grad_slots[i] = (path, layer or None).
    named = _named_leaves(abs_params)
    self._stacked = [_layer_offset(cfg.model, n) is not None for n, _ in named]
    self.grad_slots = []
    for n, x in named:
      off = _layer_offset(cfg.model, n)
      if off is None:
        self.grad_slots.append((n, None))
      else:
        self.grad_slots += [(n, off + i) for i in range(x.shape[0])]
    self.param_shardings = sharding.state_shardings(abs_params, self.mesh, self.rules)
    self.rest_shardings = sharding.state_shardings(abs_rest, self.mesh, self.rules)
    # Adam moments mirror the params (Variables keep their logical axes); counters replicate.
    abs_opt = jax.eval_shape(self.tx.init, abs_params)
    self.opt_shardings = sharding.tree_shardings(abs_opt, self.mesh, self.rules)
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.replicated = rep
    self.state_shardings = TrainState(
      step=rep,
      params=self.param_shardings,
      rest=self.rest_shardings,
      opt_state=self.opt_shardings,
      rng=rep,
    )
    shape = (cfg.data.batch_size, cfg.data.seq_len)  # global batch
    self.batch_shardings = {
      "tokens": sharding.batch_sharding(self.mesh, shape, self.rules),
      "loss_mask": sharding.batch_sharding(self.mesh, shape, self.rules),
    }
    self.train_step = jax.jit(
      self._train_step,
      in_shardings=(self.state_shardings, self.batch_shardings),
      out_shardings=(self.state_shardings, rep),
      donate_argnums=0,
    )
    self.eval_step = jax.jit(
      self._eval_step, in_shardings=(self.state_shardings, self.batch_shardings), out_shardings=rep
    )
    self._init_fn = None

  # ---------------------------------------------------------------------------------- state
  def split(self, m: nnx.Module):
    _, params, rest = nnx.split(m, self.filter, ...)
    return params, rest

  def merge(self, params, rest) -> nnx.Module:
    return nnx.merge(self.graphdef, params, rest)

  def init_state(self, m: nnx.Module | None = None) -> TrainState:
    """A fresh state from `m` (or a newly initialised model), placed with the shardings."""
    mode = self.cfg.init
    if mode == "auto":
      mode = "sharded" if self.mesh.size > 1 or jax.process_count() > 1 else "host"
    if m is None and mode == "sharded":
      params, rest = self.init_sharded()
    else:
      m = m if m is not None else model.build(self.cfg.model, seed=self.cfg.seed)
      params, rest = self.split(m)
      params = jax.device_put(params, self.param_shardings)
      rest = jax.device_put(rest, self.rest_shardings)
    opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
    return TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), self.replicated),
      params=params,
      rest=rest,
      opt_state=opt_state,
      rng=jax.device_put(jax.random.key_data(jax.random.key(self.cfg.seed)), self.replicated),
    )

  def init_sharded(self):
    """(params, rest) drawn by jax.random inside jit with out_shardings: each device generates
    only its own shards (threefry is partitionable), nothing full-size exists on any host.

    Same distributions as `model.build` (normal(init_std), norm weights 1, biases 0), one key per
    parameter path, so the values do not depend on the mesh.
    """
    import zlib

    if self._init_fn is not None:  # compiled once per trainer
      return self._init_fn()
    _, abs_params, abs_rest = nnx.split(model.abstract(self.cfg.model), self.filter, ...)
    seed = self.cfg.seed

    def init(abs_tree):
      key = jax.random.key(seed)

      def one(path, var):
        meta = var.get_metadata()
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if "init_std" in meta:
          k = jax.random.fold_in(key, zlib.crc32(optim.path_str(path).encode()) & 0x7FFFFFFF)
          x = jax.random.normal(k, shape, jnp.float32) * meta["init_std"]
        elif path[-1] == "weight":
          x = jnp.ones(shape, jnp.float32)
        else:
          x = jnp.zeros(shape, jnp.float32)
        return var.replace(value=x.astype(dtype))

      return nnx.map_state(one, abs_tree)

    self._init_fn = jax.jit(
      lambda: (init(abs_params), init(abs_rest)),
      out_shardings=(self.param_shardings, self.rest_shardings),
    )
    return self._init_fn()

  def put_batch(self, b: dict) -> dict:
    """This host's rows (data.batch(..., host, n_hosts)) -> global arrays on the mesh."""
    out = {}
    n = jax.process_count()
    for k in self.batch_shardings:
      x = np.asarray(b[k])
      glob = (x.shape[0] * n,) + x.shape[1:]
      s = self.batch_shardings[k]
      if glob != (self.cfg.data.batch_size, self.cfg.data.seq_len):
        s = sharding.batch_sharding(self.mesh, glob, self.rules)
      if n == 1:
        out[k] = jax.device_put(x, s)
      else:  # each process holds a contiguous block of rows: the batch axis is host-major
        out[k] = jax.make_array_from_process_local_data(s, x, glob)
    return out

  # ---------------------------------------------------------------------------------- steps
  def _loss(self, params, rest, batch):
    ph = self.cfg.phase
    m = self.merge(params, rest)
    with sharding.use_mesh_rules(self.mesh, self.rules):
      logits, aux = m(
        batch["tokens"],
        attention=ph.attention,
        indexer_loss=ph.indexer_loss,
        mtp=ph.mtp_weight > 0,
      )
    metrics = {"lm_loss": losses.lm_loss(logits, batch["tokens"], batch["loss_mask"])}
    loss = ph.lm_weight * metrics["lm_loss"]
    if ph.indexer_loss != "none":
      metrics["indexer_kl"] = losses.indexer_kl(aux)
      metrics["indexer_kl_nonfinite"] = _first_false(jnp.isfinite(aux["indexer_kl"]))
      loss = loss + ph.indexer_kl_weight * metrics["indexer_kl"]
    if ph.mtp_weight > 0 and "mtp_logits" in aux:
      metrics["mtp_loss"] = losses.mtp_loss(aux["mtp_logits"], batch["tokens"], batch["loss_mask"])
      loss = loss + ph.mtp_weight * metrics["mtp_loss"]
    metrics["loss"] = loss
    loads = {k: aux[k] for k in ("moe_load", "mtp_moe_load") if k in aux}
    return loss, (metrics, loads)

  def _train_step(self, state: TrainState, batch):
    """Pure: (state, batch) -> (state, metrics).

    metrics["grad_nonfinite"] indexes `self.grad_slots` (the first parameter / layer whose
    gradient is non-finite, -1 if none): it comes from the per-parameter sums of squares the
    gradient norm needs anyway. With nan_policy="skip" a non-finite loss or gradient norm leaves
    params, router biases and optimizer state unchanged (metrics["skipped"] = 1).
    """
    grads, (metrics, loads) = jax.grad(self._loss, has_aux=True)(state.params, state.rest, batch)
    sq = jnp.concatenate(
      [_sum_squares(g, stacked) for g, stacked in zip(jax.tree.leaves(grads), self._stacked)]
    )
    metrics["grad_norm"] = jnp.sqrt(jnp.sum(sq))
    metrics["grad_nonfinite"] = _first_false(jnp.isfinite(sq))
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])

    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rest = self._router_update(state.params, state.rest, loads)
    if self.cfg.nan_policy == "skip":
      # An elementwise select (XLA fuses it into the update) rather than lax.cond, whose
      # predicate would be read by the host every step on GPU.
      old = (state.params, state.rest, state.opt_state)
      params, rest, opt_state = jax.tree.map(
        lambda new, o: jnp.where(finite, new, o), (params, rest, opt_state), old
      )
      metrics["skipped"] = (~finite).astype(jnp.int32)
    # nan_policy "stop": the host sees the non-finite metrics and stops before saving
    metrics["lr"] = optim.schedule(self.cfg.optim)(state.step)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    new = state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state, rng=rng)
    return new, metrics

  def _router_update(self, params, rest, loads):
    """Router biases after the aux-loss-free balancing step on this batch's expert loads."""
    rate = self.cfg.phase.router_bias_rate
    if rate <= 0 or not loads:
      return rest
    m = self.merge(params, rest)
    if "moe_load" in loads:
      b = m.moe_layers.ffn.gate_bias
      b.set_value(moe.update_router_bias(b.get_value(), loads["moe_load"], rate))
    if "mtp_moe_load" in loads:
      b = m.mtp.block.ffn.gate_bias
      b.set_value(moe.update_router_bias(b.get_value(), loads["mtp_moe_load"], rate))
    return self.split(m)[1]

  def _eval_step(self, state: TrainState, batch):
    ph = self.cfg.phase
    m = self.merge(state.params, state.rest)
    with sharding.use_mesh_rules(self.mesh, self.rules):
      logits, aux = m(batch["tokens"], attention=ph.attention, metrics=self.cfg.eval_metrics)
    out = {"eval_loss": losses.lm_loss(logits, batch["tokens"], batch["loss_mask"])}
    if self.cfg.eval_metrics:
      out["indexer_recall"] = jnp.mean(aux["indexer_recall"])
      out["topk_overlap"] = jnp.mean(aux["topk_overlap"])
      out["indexer_recall_per_layer"] = aux["indexer_recall"]
    return out

  def evaluate(self, state: TrainState) -> dict:
    acc = []
    for i in range(self.cfg.eval_batches):
      host, n_hosts = jax.process_index(), jax.process_count()
      b = self.put_batch(data.batch(self.cfg.data, i, split="eval", host=host, n_hosts=n_hosts))
      acc.append(jax.device_get(self.eval_step(state, b)))
    return {k: np.mean([a[k] for a in acc], axis=0) for k in acc[0]}

  def retrieval_accuracy(self, state: TrainState, distances, per_distance: int = 8) -> dict:
    """Pass-key accuracy by distance, teacher-forced argmax: {"exact": all 5 digits right,
    "digit": share of digits right (chance 0.1)}, each {distance: accuracy}."""
    toks, mask, dist = data.passkey_eval_batch(self.cfg.data.seq_len, distances, per_distance)
    fn = jax.jit(
      lambda st, t, m: losses.answer_accuracy(
        self.merge(st.params, st.rest)(t, attention=self.cfg.phase.attention)[0], t, m
      )
    )
    exact, digit = [], []
    bs = self.cfg.data.batch_size
    for i in range(0, len(toks), bs):
      t, m = toks[i : i + bs], mask[i : i + bs]
      n = len(t)
      if n < bs:  # keep one compiled shape
        t, m = np.concatenate([t, t[: bs - n]]), np.concatenate([m, m[: bs - n]])
      out = self.put_batch({"tokens": t, "loss_mask": m})
      e, g = fn(state, out["tokens"], out["loss_mask"])
      exact.append(np.asarray(e)[:n])
      digit.append(np.asarray(g)[:n])
    exact, digit = np.concatenate(exact), np.concatenate(digit)
    return {
      "exact": {int(d): float(np.mean(exact[dist == d])) for d in distances},
      "digit": {int(d): float(np.mean(digit[dist == d])) for d in distances},
    }

  # ---------------------------------------------------------------------------------- ckpt
  def full_params(self, state: TrainState) -> dict:
    return nnx.to_pure_dict(nnx.merge_state(state.params, state.rest))

  def manager(self, workdir: str, protect: int | None = None):
    """The workdir's CheckpointManager: keeps the `ckpt.keep` newest steps and `protect` (the
    step this run was restored from and verified), so rotation never removes the last verified
    checkpoint."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as cm

    keep = [cm.LatestN(n=self.cfg.ckpt.keep)]
    if protect is not None:
      keep.append(cm.CustomSteps(steps=[protect]))
    return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      item_handlers=_item_handlers(),
      options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=self.cfg.ckpt.async_save,
        preservation_policy=cm.AnyPreservationPolicy(keep),
      ),
    )

  def _saved_trees(self, state: TrainState) -> dict:
    """The two checkpoint items holding arrays, as saved."""
    return {
      "params": self.full_params(state),
      "opt": {"opt_state": state.opt_state, "rng": state.rng, "step": state.step},
    }

  def save(self, mgr, state: TrainState, force: bool = False, extra_meta: dict | None = None):
    """Saves `state` with per-array checksums in its meta; raises NonFiniteError (and saves
    nothing) if any parameter or optimizer array is non-finite."""
    import orbax.checkpoint as ocp

    step = int(jax.device_get(state.step))
    trees = self._saved_trees(state)
    sums = _verify_finite(trees, self.cfg.model, f"step {step}", lambda m: NonFiniteError(m, step))
    meta = {
      "step": step,
      "data_position": step,
      "phase": self.cfg.phase.name,
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

  def restore(self, mgr, step: int) -> TrainState:
    """The state saved at `step`, verified: every array finite and equal to its checksum.

    Raises RunError if the checkpoint does not fit this model, CheckpointCorrupt if it is
    unreadable, non-finite or fails its checksums. `self.restored_meta` is the step's meta.
    """
    import orbax.checkpoint as ocp

    # Abstract targets carry this trainer's shardings: Orbax reads each shard straight onto the
    # target mesh, so a checkpoint written on one mesh restores on any other.
    abs_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(self.init_state_abstract),
      self.state_shardings,
    )
    abs_params = self.full_params(abs_state)
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
    _verify_finite(trees, self.cfg.model, where, CheckpointCorrupt, meta.get("checksums"))
    self.restored_meta = meta
    m = self.merge(*self._abstract_split())
    st = nnx.state(m)
    nnx.replace_by_pure_dict(st, r["params"])
    nnx.update(m, st)
    params, rest = self.split(m)
    return TrainState(
      step=jnp.asarray(r["opt"]["step"]),
      params=jax.device_put(params, self.param_shardings),
      rest=jax.device_put(rest, self.rest_shardings),
      opt_state=r["opt"]["opt_state"],
      rng=r["opt"]["rng"],
    )

  def restore_latest_good(self, mgr, workdir: str) -> tuple[TrainState, int]:
    """Restores the newest step that verifies; a bad newer step is moved to
    workdir/corrupt_checkpoints/ with a warning. RunError when no step is good."""
    bad = []
    for step in sorted(mgr.all_steps(), reverse=True):
      try:
        state = self.restore(mgr, step)
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
      return state, step
    raise RunError(
      f"no usable checkpoint in {mgr.directory}: "
      + "; ".join(m for _, m in bad)
      + " (move the workdir aside to start over)"
    )

  def _abstract_split(self):
    _, p, r = nnx.split(model.abstract(self.cfg.model), self.filter, ...)
    return p, r

  def init_state_abstract(self) -> TrainState:
    p, r = self._abstract_split()
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=p,
      rest=r,
      opt_state=self.tx.init(p),
      rng=jax.random.key_data(jax.random.key(0)),
    )


def _path_name(path) -> str:
  parts = []
  for k in path:
    k = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
    if k != "value":  # nnx.Variable's value attribute
      parts.append(str(k))
  return "/".join(parts)


def _named_leaves(tree) -> list:
  """[(slash-joined path, leaf)] in jax.tree.leaves order."""
  return [(_path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _layer_offset(cfg: ModelConfig, name: str) -> int | None:
  """Model layer of index 0 of a layer-stacked array's leading axis; None if not stacked."""
  parts = name.split("/")
  if "dense_layers" in parts:
    return 0
  if "moe_layers" in parts:
    return cfg.n_dense_layers
  return None


def _first_false(ok):
  """Index of the first False in a boolean vector, -1 if none (int32 scalar)."""
  return jnp.where(jnp.all(ok), -1, jnp.argmin(ok)).astype(jnp.int32)


def _sum_squares(g, stacked: bool):
  """Sum of squares of g in fp32: per layer (shape [layers]) if stacked, else shape [1]."""
  sq = jnp.square(g.astype(jnp.float32))
  if stacked:
    return jnp.sum(sq, axis=tuple(range(1, g.ndim)))
  return jnp.sum(sq)[None]


def _verify_finite(trees, cfg: ModelConfig, where: str, error, expected: dict | None = None):
  """{array name: checksum} of `trees`; raises error(message) naming the first array (and layer)
  whose checksum differs from `expected` or that holds a non-finite value."""
  named = _named_leaves(trees)
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
    raise error(f"{where}: non-finite values in {name}{_bad_layer(cfg, name, x)}")
  return got


def _bad_layer(cfg: ModelConfig, name: str, x) -> str:
  off = _layer_offset(cfg, name)
  if off is None or np.ndim(x) < 1:
    return ""
  ok = jax.device_get(jax.jit(lambda a: jnp.all(jnp.isfinite(a), axis=tuple(range(1, a.ndim))))(x))
  return f" (layer {off + int(np.argmin(ok))})" if not np.all(ok) else ""


def _item_handlers():
  import orbax.checkpoint as ocp

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
  import orbax.checkpoint as ocp

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
  meta = r["meta"] if isinstance(r.get("meta"), dict) else {}
  sums = {k[len("params/") :]: v for k, v in meta.get("checksums", {}).items()}
  hint = f" (pass {path}@STEP to start from an earlier step of {sorted(steps)})"
  _verify_finite(r["params"], cfg, where, lambda msg: ValueError(msg + hint), sums)
  st = nnx.state(m)
  nnx.replace_by_pure_dict(st, r["params"])
  nnx.update(m, st)
  return m


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


# Model fields that do not change the parameters or the math: free to change on resume.
_RESUME_FREE_MODEL_FIELDS = ("impl", "attn_block_q", "remat", "max_batch_size", "init_std")


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
  cfg: TrainConfig, workdir: str, *, log_fn=None, allow_config_change: bool = False
) -> dict:
  """Runs (or resumes) one phase in `workdir`; returns the final metrics and eval results.

  Resumes exactly from the latest good checkpoint in workdir (params, optimizer, RNG, data
  position); otherwise starts from `ckpt.init_from` params (fresh optimizer) or a fresh init.
  SIGTERM or SIGINT saves a checkpoint and returns with result["preempted"] and
  result["signal"]. Each run appends its config to workdir/config.<n>.json.

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
  # then is caught too: the first step runs, is saved, and train returns.
  preempted = _Preempted()
  old = {}
  if _main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      old[sig] = signal.signal(sig, preempted)
  try:
    return _train(cfg, workdir, lead, preempted, log_fn, allow_config_change)
  finally:
    for sig, h in old.items():
      signal.signal(sig, h)
    if lock is not None:
      lock.__exit__(None, None, None)


def _train(cfg, workdir, lead, preempted, log_fn, allow_config_change) -> dict:
  managers = []  # closed at the end: Orbax's threads would otherwise outlive the run
  try:
    return _train_phase(cfg, workdir, lead, preempted, log_fn, allow_config_change, managers)
  finally:
    for m in managers:
      m.close()


def _train_phase(cfg, workdir, lead, preempted, log_fn, allow_config_change, managers) -> dict:
  trainer = _cached_trainer(cfg)
  if lead:  # a save killed midway leaves a temporary step directory (this run holds the lock)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    for d in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else ():
      if ".orbax-checkpoint-tmp" in d:
        shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
  mgr = trainer.manager(workdir)
  managers.append(mgr)
  latest = mgr.latest_step()
  skipped = 0
  if latest is not None:
    if cfg.steps < latest:
      raise RunError(
        f"steps={cfg.steps} is below step {latest} already saved in {workdir}; "
        "raise steps to continue, or use another workdir"
      )
    diffs = resume_differences(cfg, workdir, _saved_phase(mgr, latest))
    if diffs and not allow_config_change:
      raise RunError(
        f"workdir {workdir} was produced by another config: {'; '.join(diffs)} "
        "(use another workdir, or allow_config_change to resume anyway)"
      )
    if diffs:
      log.warning("resuming %s with a changed config: %s", workdir, "; ".join(diffs))
    state, step = trainer.restore_latest_good(mgr, workdir)
    skipped = int(trainer.restored_meta.get("skipped", 0))
    mgr = trainer.manager(workdir, protect=step)  # never rotate out the verified step
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
  writer = _Writer(workdir, enabled=lead, start=start, final=cfg.steps)
  bar = _bar(cfg, start)
  host, n_hosts = jax.process_index(), jax.process_count()
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  run = _RunState(trainer, writer, bar, log_fn, skipped, tokens_per_step)
  try:
    for step in range(start, cfg.steps):
      batch = trainer.put_batch(data.batch(cfg.data, step, host=host, n_hosts=n_hosts))
      state, metrics = trainer.train_step(state, batch)
      done = step + 1
      run.add(done, metrics)
      if done % cfg.log_every == 0 or done == cfg.steps:
        run.check(done, mgr, write_row=True)
      if bar is not None:
        bar.update(1)
      if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
        writer.scalars(done, _scalar(trainer.evaluate(state)))
      # preempted.flag is read once here: a signal during the save is handled after it
      stop = preempted.flag
      if done % cfg.ckpt.every == 0 or done == cfg.steps or stop:
        run.check(done, mgr, write_row=False)  # every step's metrics are seen before any save
        force = done == cfg.steps or stop
        trainer.save(mgr, state, force=force, extra_meta={"skipped": run.skipped})
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
    "train": run.last,
    "preempted": preempted.flag,
    "signal": sig,
  }
  if not preempted.flag:
    ev = trainer.evaluate(state)
    result["eval"] = {k: np.asarray(v).tolist() for k, v in ev.items()}
    writer.scalars(result["step"], _scalar(ev))
  writer.close()
  if lead:
    with open(os.path.join(workdir, "result.json"), "w") as f:
      json.dump(result, f, indent=1)
  result["_state"] = state
  result["_trainer"] = trainer
  return result


class _RunState:
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
      bad = _first_nonfinite(self.trainer, rows)
    if write_row or bad:
      self.last = _scalar(rows[-1][1])
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


def _first_nonfinite(trainer: Trainer, rows) -> tuple[int, str] | None:
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


def _saved_phase(mgr, step) -> str | None:
  """The phase name in a checkpoint's meta (None if unreadable: the restore reports that)."""
  try:
    with open(os.path.join(str(mgr.directory), str(step), "meta", "metadata")) as f:
      return json.load(f).get("phase")
  except (OSError, ValueError):
    return None


_TRAINERS: dict = {}


def _cached_trainer(cfg: TrainConfig) -> Trainer:
  """Reuses the jitted steps of an identical phase (runs differing only in length, logging,
  checkpointing or init_from compile once per process)."""
  key = dataclasses.replace(
    cfg, steps=1, ckpt=CkptConfig(), log_every=1, eval_every=0, progress=False
  )
  if key not in _TRAINERS:
    _TRAINERS[key] = Trainer(cfg)
  t = _TRAINERS[key]
  t.cfg = cfg
  return t


def _scalar(d):
  skip = ("grad_nonfinite", "indexer_kl_nonfinite")
  return {k: float(v) for k, v in d.items() if np.ndim(v) == 0 and k not in skip}


def _main_thread() -> bool:
  import threading

  return threading.current_thread() is threading.main_thread()


def _bar(cfg: TrainConfig, start: int):
  if not cfg.progress:
    return None
  import tqdm

  return tqdm.tqdm(total=cfg.steps, initial=start, desc=cfg.phase.name, dynamic_ncols=True)


class _Writer:
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
    import sys

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
