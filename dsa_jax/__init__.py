# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""dsa-jax: DeepSeek Sparse Attention (DeepSeek-V3.2-Exp) in JAX / Flax NNX."""

from dsa_jax.config import PRESETS, ModelConfig, preset
from dsa_jax.model import Transformer, abstract, build, param_count

__all__ = ["PRESETS", "ModelConfig", "Transformer", "abstract", "build", "param_count", "preset"]
