# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""DeepSeek-V4 (Flash / Pro): CSA, HCA and window-only attention with sinks, hyper-connections,
sqrt-softplus / hash-routed MoE and MTP, in the dsa-jax conventions (docs/v4.md)."""

from dsa_jax.v4.config import PRESETS, V4Config, preset
from dsa_jax.v4.model import V4Transformer, abstract, build, param_count, param_counts

__all__ = [
  "PRESETS",
  "V4Config",
  "V4Transformer",
  "abstract",
  "build",
  "param_count",
  "param_counts",
  "preset",
]
