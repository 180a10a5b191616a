# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""AdamW + warmup-cosine (optax) and the per-phase trainable-parameter filter."""

from __future__ import annotations

import dataclasses
import re

import jax
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  lr: float = 1e-3
  warmup_steps: int = 10
  total_steps: int = 100
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1
  grad_clip: float = 1.0

  def __post_init__(self):
    if not self.lr > 0:
      raise ValueError(f"OptimConfig.lr={self.lr} must be > 0")
    if self.warmup_steps < 0 or self.total_steps <= 0:
      raise ValueError(
        f"OptimConfig warmup_steps={self.warmup_steps} must be >= 0 and total_steps="
        f"{self.total_steps} > 0"
      )
    if not 0 <= self.min_lr_ratio <= 1:
      raise ValueError(f"OptimConfig.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


def schedule(cfg: OptimConfig):
  return optax.warmup_cosine_decay_schedule(
    0.0,
    cfg.lr,
    warmup_steps=min(cfg.warmup_steps, max(cfg.total_steps - 1, 0)),
    decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
    end_value=cfg.lr * cfg.min_lr_ratio,
  )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; weight decay only on matrices (not norms / biases)."""
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  return optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.adamw(
      schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask
    ),
  )


def path_str(path) -> str:
  return "/".join(str(p) for p in path)


def trainable_filter(regex: str):
  """nnx filter: Params whose '/'-joined path matches `regex` (re.search). Router biases never."""
  try:
    rx = re.compile(regex)
  except re.error as e:
    raise ValueError(f"trainable regex {regex!r} is invalid: {e}") from None
  return lambda path, x: isinstance(x, nnx.Param) and rx.search(path_str(path)) is not None
