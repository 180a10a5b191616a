# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The training step (docs/dsa.md §Training): `Trainer` holds one phase's static parts (graphdef,
optimizer, mesh, shardings) and its jitted, pure `train_step` / `eval_step`.

`train_step` guards finiteness on device: the gradient's per-parameter (per-layer for stacked
parameters) sums of squares name the first non-finite gradient (`Trainer.grad_slots`), and with
`nan_policy="skip"` a non-finite step's update is dropped by an elementwise select.
"""

from __future__ import annotations

import copy
import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from dsa_jax import data, losses, model, moe, optim, sharding
from dsa_jax.config import ModelConfig
from dsa_jax.train_config import CkptConfig, TrainConfig
from dsa_jax.v4.config import V4Config


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
    named = named_leaves(abs_params)
    self._stacked = [layer_offset(cfg.model, n) is not None for n, _ in named]
    self.grad_slots = []
    for n, x in named:
      off = layer_offset(cfg.model, n)
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

  def reuse_for(self, cfg: TrainConfig) -> Trainer:
    """A trainer for `cfg` sharing this one's compiled steps: `cfg` may differ from `self.cfg`
    only in what the steps never read (steps, ckpt, log_every, eval_every, progress); anything
    else raises ValueError. Runs of one phase that differ only in length compile once."""
    if _step_key(cfg) != _step_key(self.cfg):
      a, b = dataclasses.asdict(_step_key(self.cfg)), dataclasses.asdict(_step_key(cfg))
      diff = sorted(k for k in a if a[k] != b[k])
      raise ValueError(f"trainer was built for another config: {diff} differ")
    t = copy.copy(self)
    t.cfg = cfg
    return t

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
    chunk = self.cfg.loss_chunk
    with sharding.use_mesh_rules(self.mesh, self.rules):
      logits, aux = m(
        batch["tokens"],
        attention=ph.attention,
        indexer_loss=ph.indexer_loss,
        mtp=ph.mtp_weight > 0,
        hidden=chunk > 0,
      )
      metrics = {"lm_loss": self._lm_loss(m, logits, batch)}
    loss = ph.lm_weight * metrics["lm_loss"]
    if ph.indexer_loss != "none":
      metrics["indexer_kl"] = losses.indexer_kl(aux)
      metrics["indexer_kl_nonfinite"] = _first_false(jnp.isfinite(aux["indexer_kl"]))
      loss = loss + ph.indexer_kl_weight * metrics["indexer_kl"]
    if ph.mtp_weight > 0 and "mtp_hidden" in aux:
      with sharding.use_mesh_rules(self.mesh, self.rules):
        metrics["mtp_loss"] = losses.mtp_loss_from_hidden(
          aux["mtp_hidden"], m.head, batch["tokens"], batch["loss_mask"], chunk
        )
      loss = loss + ph.mtp_weight * metrics["mtp_loss"]
    elif ph.mtp_weight > 0 and "mtp_logits" in aux:
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
    if isinstance(self.cfg.model, V4Config):  # per-layer blocks; hash-routed ones have no bias
      ffns = [(blk.ffn, loads["moe_load"][i]) for i, blk in enumerate(m.layers)]
      if "mtp_moe_load" in loads:
        ffns.append((m.mtp.block.ffn, loads["mtp_moe_load"]))
      for ffn, load in ffns:
        if not ffn.hashed:
          ffn.gate_bias.set_value(moe.update_router_bias(ffn.gate_bias.get_value(), load, rate))
      return self.split(m)[1]
    if "moe_load" in loads:
      b = m.moe_layers.ffn.gate_bias
      b.set_value(moe.update_router_bias(b.get_value(), loads["moe_load"], rate))
    if "mtp_moe_load" in loads:
      b = m.mtp.block.ffn.gate_bias
      b.set_value(moe.update_router_bias(b.get_value(), loads["mtp_moe_load"], rate))
    return self.split(m)[1]

  def _lm_loss(self, m, out, batch):
    """LM loss from the model's output: logits, or with loss_chunk the head's input."""
    if self.cfg.loss_chunk:
      return losses.lm_loss_from_hidden(
        out, m.head, batch["tokens"], batch["loss_mask"], self.cfg.loss_chunk
      )
    return losses.lm_loss(out, batch["tokens"], batch["loss_mask"])

  def _eval_step(self, state: TrainState, batch):
    ph = self.cfg.phase
    m = self.merge(state.params, state.rest)
    with sharding.use_mesh_rules(self.mesh, self.rules):
      logits, aux = m(
        batch["tokens"],
        attention=ph.attention,
        metrics=self.cfg.eval_metrics,
        hidden=self.cfg.loss_chunk > 0,
      )
      out = {"eval_loss": self._lm_loss(m, logits, batch)}
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

  def full_params(self, state: TrainState) -> dict:
    return nnx.to_pure_dict(nnx.merge_state(state.params, state.rest))

  def abstract_split(self):
    _, p, r = nnx.split(model.abstract(self.cfg.model), self.filter, ...)
    return p, r

  def init_state_abstract(self) -> TrainState:
    p, r = self.abstract_split()
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=p,
      rest=r,
      opt_state=self.tx.init(p),
      rng=jax.random.key_data(jax.random.key(0)),
    )


def _step_key(cfg: TrainConfig) -> TrainConfig:
  """`cfg` with the fields the jitted steps never read set to fixed values."""
  return dataclasses.replace(
    cfg, steps=1, ckpt=CkptConfig(), log_every=1, eval_every=0, progress=False
  )


def _path_name(path) -> str:
  parts = []
  for k in path:
    k = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
    if k != "value":  # nnx.Variable's value attribute
      parts.append(str(k))
  return "/".join(parts)


def named_leaves(tree) -> list:
  """[(slash-joined path, leaf)] in jax.tree.leaves order."""
  return [(_path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def layer_offset(cfg: ModelConfig, name: str) -> int | None:
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
