# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""AdamW + warmup-cosine (optax) and the per-phase trainable-parameter filter."""

from __future__ import annotations

import dataclasses
import math
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
    check_number("OptimConfig", "lr", self.lr, lo=0, lo_open=True)
    check_number("OptimConfig", "min_lr_ratio", self.min_lr_ratio, lo=0, hi=1)
    check_number("OptimConfig", "b1", self.b1, lo=0, hi=1, hi_open=True)
    check_number("OptimConfig", "b2", self.b2, lo=0, hi=1, hi_open=True)
    check_number("OptimConfig", "weight_decay", self.weight_decay, lo=0)
    check_number("OptimConfig", "grad_clip", self.grad_clip, lo=0, lo_open=True)
    check_int("OptimConfig", "warmup_steps", self.warmup_steps, 0)
    check_int("OptimConfig", "total_steps", self.total_steps, 1)


def check_number(where: str, name: str, v, lo=None, hi=None, lo_open=False, hi_open=False):
  """Raises ValueError unless v is a finite number (math.isfinite) within the bounds (open ends
  where asked). Shared by the training configs (train_config.py)."""
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


def check_int(where: str, name: str, v, lo: int):
  """Raises ValueError unless v is an int (not a bool) >= lo."""
  if not isinstance(v, int) or isinstance(v, bool) or v < lo:
    raise ValueError(f"{where}.{name}={v!r} must be an integer >= {lo}")


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
