# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint conversion between Hugging Face DeepSeek safetensors and dsa_jax Orbax params."""

from dsa_jax.convert.deepseek_hf import (
  NAME_MAP,
  config_from_hf,
  hf_config_dict,
  hf_to_orbax,
  orbax_to_hf,
  plan,
)

__all__ = ["NAME_MAP", "config_from_hf", "hf_config_dict", "hf_to_orbax", "orbax_to_hf", "plan"]
