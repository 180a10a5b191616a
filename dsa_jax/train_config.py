# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The configs of one training run (docs/architecture.md §Configs) and the errors a run reports.

A phase is data: which attention runs, which indexer loss, which parameters train (a regex over
parameter paths), the loss weights. Each phase is its own run; a later phase starts from an
earlier one's parameters with `ckpt.init_from` (fresh optimizer).
- dense: dense attention, LM loss, everything but the indexer trains (the control).
- warmup: dense attention, dense KL only, only the indexer trains; optimizer state
  exists only for indexer parameters; every other parameter stays bit-identical.
- sparse: DSA attention, LM loss + sparse KL, everything trains; the indexer reads
  stop-gradient inputs, so the LM loss never reaches it and the KL never reaches the main model.
"""

from __future__ import annotations

import dataclasses

from dsa_jax import data, mla, optim
from dsa_jax.config import ModelConfig
from dsa_jax.v4.config import V4Config


class RunError(ValueError):
  """A run cannot start or go on (workdir in use, refused resume, no usable checkpoint)."""


class CheckpointCorrupt(RunError):
  """A checkpoint step is unreadable, non-finite or fails its checksums."""


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss, gradient or parameter; nothing non-finite was saved."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


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
      optim.check_number("PhaseConfig", f, getattr(self, f), lo=0)
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
    optim.check_int("CkptConfig", "every", self.every, 1)
    optim.check_int("CkptConfig", "keep", self.keep, 1)
    if self.init_from is not None and not isinstance(self.init_from, str):
      raise ValueError(f"CkptConfig.init_from={self.init_from!r} must be a path or None")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  model: ModelConfig | V4Config  # V3.2 (dsa_jax.config) or DeepSeek-V4 (dsa_jax.v4)
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
  # Tokens per chunk of the LM / MTP cross-entropy (losses.head_xent): the [B,T,V] logits are
  # never built, each chunk's are rebuilt in the backward. 0: the whole logits at once.
  loss_chunk: int = 0
  # "host": numpy init of the full model on every host, then device_put (fast for small models);
  # "sharded": jitted jax.random init with out_shardings, each device makes only its shards (no
  # full copy anywhere); "auto": sharded when the mesh has more than one device or process.
  init: str = "auto"

  def __post_init__(self):
    optim.check_int("TrainConfig", "steps", self.steps, 1)
    optim.check_int("TrainConfig", "log_every", self.log_every, 1)
    optim.check_int("TrainConfig", "eval_every", self.eval_every, 0)
    optim.check_int("TrainConfig", "eval_batches", self.eval_batches, 1)
    optim.check_int("TrainConfig", "loss_chunk", self.loss_chunk, 0)
    if self.nan_policy not in ("stop", "skip"):
      raise ValueError(f"TrainConfig.nan_policy={self.nan_policy!r}; expected stop|skip")
    if self.data.seq_len > self.model.max_seq_len:
      raise ValueError(
        f"DataConfig.seq_len={self.data.seq_len} exceeds ModelConfig.max_seq_len={self.model.max_seq_len}"
      )
    if self.model.vocab_size < 256:
      raise ValueError(f"ModelConfig.vocab_size={self.model.vocab_size} < 256 byte tokens")
    if self.init not in ("auto", "host", "sharded"):
      raise ValueError(f"TrainConfig.init={self.init!r}; expected auto|host|sharded")
