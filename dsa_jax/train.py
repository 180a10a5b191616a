# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Two-phase DSA training (dsa_spec.md §7): a pure `train_step`, `eval_step` and the loop.

A phase is data (STYLE.md §2.4): which attention runs, which indexer loss, which parameters train
(a regex over parameter paths), the loss weights. Each phase is its own run; a later phase starts
from an earlier one's parameters with `ckpt.init_from` (fresh optimizer).
- dense: dense attention, LM loss, everything but the indexer trains (the control).
- warmup: dense attention, dense KL only, only the indexer trains (spec §7.1); optimizer state
  exists only for indexer parameters; every other parameter stays bit-identical.
- sparse: DSA attention, LM loss + sparse KL, everything trains (spec §7.2); the indexer reads
  stop-gradient inputs, so the LM loss never reaches it and the KL never reaches the main model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from dsa_jax import checkpoint, data, losses, model, moe, optim, sharding
from dsa_jax.config import ModelConfig


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
    if self.attention not in ("dense", "dense_mqa", "sparse"):
      raise ValueError(f"PhaseConfig.attention={self.attention!r}; expected dense|sparse")
    if self.indexer_loss not in ("none", "dense", "sparse"):
      raise ValueError(
        f"PhaseConfig.indexer_loss={self.indexer_loss!r}; expected none|dense|sparse"
      )
    if self.indexer_loss == "sparse" and self.attention != "sparse":
      raise ValueError("PhaseConfig.indexer_loss='sparse' needs attention='sparse'")
    for f in ("lm_weight", "indexer_kl_weight", "mtp_weight", "router_bias_rate"):
      if getattr(self, f) < 0:
        raise ValueError(f"PhaseConfig.{f}={getattr(self, f)} must be >= 0")
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
  every: int = 100
  keep: int = 3
  async_save: bool = True
  init_from: str | None = None  # params-only start (a workdir or a params checkpoint dir)


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
  # "host": numpy init of the full model on every host, then device_put (fast for small models);
  # "sharded": jitted jax.random init with out_shardings, each device makes only its shards (no
  # full copy anywhere); "auto": sharded when the mesh has more than one device or process.
  init: str = "auto"

  def __post_init__(self):
    if self.steps <= 0:
      raise ValueError(f"TrainConfig.steps={self.steps} must be > 0")
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
      loss = loss + ph.indexer_kl_weight * metrics["indexer_kl"]
    if ph.mtp_weight > 0 and "mtp_logits" in aux:
      metrics["mtp_loss"] = losses.mtp_loss(aux["mtp_logits"], batch["tokens"], batch["loss_mask"])
      loss = loss + ph.mtp_weight * metrics["mtp_loss"]
    metrics["loss"] = loss
    loads = {k: aux[k] for k in ("moe_load", "mtp_moe_load") if k in aux}
    return loss, (metrics, loads)

  def _train_step(self, state: TrainState, batch):
    """Pure: (state, batch) -> (state, metrics)."""
    grads, (metrics, loads) = jax.grad(self._loss, has_aux=True)(state.params, state.rest, batch)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rest = state.rest
    rate = self.cfg.phase.router_bias_rate
    if rate > 0 and loads:
      m = self.merge(state.params, rest)
      if "moe_load" in loads:
        b = m.moe_layers.ffn.gate_bias
        b.set_value(moe.update_router_bias(b.get_value(), loads["moe_load"], rate))
      if "mtp_moe_load" in loads:
        b = m.mtp.block.ffn.gate_bias
        b.set_value(moe.update_router_bias(b.get_value(), loads["mtp_moe_load"], rate))
      _, rest = self.split(m)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["lr"] = optim.schedule(self.cfg.optim)(state.step)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    new = state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state, rng=rng)
    return new, metrics

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

  def manager(self, workdir: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      item_handlers=_item_handlers(),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=self.cfg.ckpt.keep, enable_async_checkpointing=self.cfg.ckpt.async_save
      ),
    )

  def save(self, mgr, state: TrainState, force: bool = False):
    import orbax.checkpoint as ocp

    step = int(jax.device_get(state.step))
    meta = {"step": step, "data_position": step, "phase": self.cfg.phase.name}
    mgr.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(self.full_params(state)),
        opt=ocp.args.StandardSave(
          {"opt_state": state.opt_state, "rng": state.rng, "step": state.step}
        ),
        meta=ocp.args.JsonSave(meta),
      ),
      force=force,
    )

  def restore(self, mgr, step: int) -> TrainState:
    import orbax.checkpoint as ocp

    # Abstract targets carry this trainer's shardings: Orbax reads each shard straight onto the
    # target mesh, so a checkpoint written on one mesh restores on any other.
    abs_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(self.init_state_abstract),
      self.state_shardings,
    )
    abs_params = self.full_params(abs_state)
    try:
      pmeta = _params_meta(mgr, step)
      if pmeta is not None:
        checkpoint.check_tree(pmeta, abs_params, f"checkpoint step {step}")
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
    except ValueError:
      raise
    except Exception as e:  # noqa: BLE001 - re-raised with what was being restored
      raise ValueError(
        f"checkpoint step {step} in {mgr.directory} could not be restored: {e}"
      ) from e
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
  """Params-only start: from a training workdir (latest step) or a params checkpoint dir."""
  import orbax.checkpoint as ocp

  step = None
  if "@" in os.path.basename(path):  # workdir@step picks a step other than the latest
    path, s = path.rsplit("@", 1)
    if not s.isdigit():
      raise ValueError(f"init_from={path}@{s}: the step after '@' must be an integer")
    step = int(s)
  path = os.path.abspath(path)
  m = model.build(cfg)
  ckpt_dir = os.path.join(path, "checkpoints")
  if os.path.isdir(ckpt_dir):
    mgr = ocp.CheckpointManager(ckpt_dir, item_handlers=_item_handlers())
    steps = mgr.all_steps()
    if not steps:
      raise ValueError(f"init_from={path}: no checkpoint steps in {ckpt_dir}")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f"init_from={path}@{step}: step not found; available {sorted(steps)}")
    want = nnx.to_pure_dict(nnx.state(m))
    pmeta = _params_meta(mgr, step)
    if pmeta is not None:
      checkpoint.check_tree(pmeta, want, f"init_from={path} step {step}")
    abs_want = _shape_dtype(want)
    try:
      r = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abs_want)))
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"init_from={path} step {step} could not be restored: {e}") from e
    st = nnx.state(m)
    nnx.replace_by_pure_dict(st, r["params"])
    nnx.update(m, st)
    return m
  return checkpoint.load_params(path, m)


class _Preempted:
  def __init__(self):
    self.flag = False

  def __call__(self, signum, frame):
    del signum, frame
    self.flag = True


def train(cfg: TrainConfig, workdir: str, *, log_fn=None) -> dict:
  """Runs (or resumes) one phase in `workdir`; returns the final metrics and eval results.

  Resumes exactly from the latest checkpoint in workdir (params, optimizer, RNG, data position);
  otherwise starts from `ckpt.init_from` params (fresh optimizer) or a fresh init. SIGTERM saves a
  checkpoint and returns cleanly.
  """
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:  # the model's resolved config: what generate/convert rebuild from
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
      json.dump(cfg.model.to_dict(), f, indent=1)
  # Installed before the (possibly long: sharded init compiles) start-up, so that a preemption
  # then is caught too: the first step runs, is saved, and train returns.
  preempted = _Preempted()
  old = signal.signal(signal.SIGTERM, preempted) if _main_thread() else None
  try:
    trainer = _cached_trainer(cfg)
    mgr = trainer.manager(workdir)
    latest = mgr.latest_step()
    if latest is not None:
      state = trainer.restore(mgr, latest)
    elif cfg.ckpt.init_from:
      state = trainer.init_state(load_init_params(cfg.ckpt.init_from, cfg.model))
    else:
      state = trainer.init_state()
  except BaseException:
    if old is not None:
      signal.signal(signal.SIGTERM, old)
    raise
  start = int(jax.device_get(state.step))
  writer = _Writer(workdir, enabled=jax.process_index() == 0)  # one writer on a shared workdir
  bar = _bar(cfg, start)
  host, n_hosts = jax.process_index(), jax.process_count()
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  last = {}
  t_last, steps_since = time.perf_counter(), 0
  try:
    for step in range(start, cfg.steps):
      batch = trainer.put_batch(data.batch(cfg.data, step, host=host, n_hosts=n_hosts))
      state, metrics = trainer.train_step(state, batch)
      steps_since += 1
      done = step + 1
      if done % cfg.log_every == 0 or done == cfg.steps:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = time.perf_counter() - t_last
        last["tokens_per_s"] = steps_since * tokens_per_step / max(dt, 1e-9)
        t_last, steps_since = time.perf_counter(), 0
        writer.scalars(done, last)
        if log_fn:
          log_fn(done, last)
        if bar is not None:
          bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "grad_norm") if k in last})
      if bar is not None:
        bar.update(1)
      if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
        writer.scalars(done, _scalar(trainer.evaluate(state)))
      if done % cfg.ckpt.every == 0 or done == cfg.steps or preempted.flag:
        trainer.save(mgr, state, force=done == cfg.steps or preempted.flag)
      if preempted.flag:
        break
    mgr.wait_until_finished()
  finally:
    if old is not None:
      signal.signal(signal.SIGTERM, old)
    if bar is not None:
      bar.close()
  result = {"step": int(jax.device_get(state.step)), "train": last, "preempted": preempted.flag}
  if not preempted.flag:
    ev = trainer.evaluate(state)
    result["eval"] = {k: np.asarray(v).tolist() for k, v in ev.items()}
    writer.scalars(result["step"], _scalar(ev))
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "result.json"), "w") as f:
      json.dump(result, f, indent=1)
  result["_state"] = state
  result["_trainer"] = trainer
  return result


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
  return {k: float(v) for k, v in d.items() if np.ndim(v) == 0}


def _main_thread() -> bool:
  import threading

  return threading.current_thread() is threading.main_thread()


def _bar(cfg: TrainConfig, start: int):
  if not cfg.progress:
    return None
  import tqdm

  return tqdm.tqdm(total=cfg.steps, initial=start, desc=cfg.phase.name, dynamic_ncols=True)


class _Writer:
  """metrics.jsonl always; TensorBoard scalars when tensorboardX is installed."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.f = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
    self.tb = None
    if not enabled:
      return
    try:
      import tensorboardX

      self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:
      self.tb = None

  def scalars(self, step: int, d: dict):
    if self.f is None:
      return
    self.f.write(json.dumps({"step": step, **d}) + "\n")
    self.f.flush()
    if self.tb is not None:
      for k, v in d.items():
        self.tb.add_scalar(k, v, step)

  def close(self):
    if self.f is not None:
      self.f.close()
    if self.tb is not None:
      self.tb.close()
