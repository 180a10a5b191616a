# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""HF DeepSeek-V3.2(-Exp) / V3.1 safetensors <-> dsa_jax Orbax params checkpoint.

  python -m experiments.convert_checkpoint --direction=hf_to_orbax --hf_dir=DIR --orbax_dir=DIR \
      [--dtype=fp32|bf16] [--config_overrides='{"index_topk": 2048}']
  python -m experiments.convert_checkpoint --direction=orbax_to_hf --orbax_dir=DIR --hf_dir=DIR \
      [--dtype=bf16|fp32] [--fp8_export] [--model_config=config.json]

hf_to_orbax: --dtype is the storage dtype (default fp32; FP8 weights are dequantised). A V3/V3.1
source (model_type deepseek_v3) gets freshly initialised indexers, ready for the warm-up.
orbax_to_hf: --dtype forces every non-FP8 tensor's dtype (default: each tensor's source dtype, else
bf16); --fp8_export writes Linear weights as e4m3 with 128x128 block scales (bit-exact for an
unchanged FP8 import). --model_config (a ModelConfig JSON or an HF config.json) is needed only for
checkpoints that hf_to_orbax did not write (e.g. `checkpoint.save_params` from training).
"""

import json
import sys

from absl import app, flags, logging

from dsa_jax import convert
from dsa_jax.config import ModelConfig

_DIRECTION = flags.DEFINE_enum("direction", None, ["hf_to_orbax", "orbax_to_hf"], "which way")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF directory (config.json, index, shards)")
_ORBAX_DIR = flags.DEFINE_string("orbax_dir", None, "Orbax params checkpoint directory")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bf16", "fp32"], "see the module docstring")
_FP8 = flags.DEFINE_bool("fp8_export", False, "orbax_to_hf: FP8 e4m3 weights + block scales")
_MODEL_CONFIG = flags.DEFINE_string(
  "model_config", None, "orbax_to_hf: config JSON if not recorded"
)
_OVERRIDES = flags.DEFINE_string("config_overrides", None, "hf_to_orbax: ModelConfig fields, JSON")
_SEED = flags.DEFINE_integer("seed", 0, "hf_to_orbax: seed of fresh indexers (V3.1 source)")
_INIT_IDX = flags.DEFINE_bool(
  "init_missing_indexers", False, "hf_to_orbax: initialise indexer tensors a V3.2 source lacks"
)
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "orbax_to_hf: shard size for a new layout")
flags.mark_flags_as_required(["direction", "hf_dir", "orbax_dir"])


def _model_config(path):
  with open(path) as f:
    d = json.load(f)
  return convert.config_from_hf(d) if "model_type" in d else ModelConfig.from_dict(d)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax / absl INFO chatter only on request
    logging.set_verbosity(logging.WARNING)
  try:
    _convert()
  except (ValueError, OSError) as e:  # bad input: one line, exit 2
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _convert():
  if _DIRECTION.value == "hf_to_orbax":
    cfg = convert.hf_to_orbax(
      _HF_DIR.value,
      _ORBAX_DIR.value,
      dtype=_DTYPE.value or "fp32",
      overrides=json.loads(_OVERRIDES.value) if _OVERRIDES.value else None,
      seed=_SEED.value,
      init_missing_indexers=_INIT_IDX.value,
    )
    print(f"wrote {_ORBAX_DIR.value}: {cfg}")
  else:
    convert.orbax_to_hf(
      _ORBAX_DIR.value,
      _HF_DIR.value,
      cfg=_model_config(_MODEL_CONFIG.value) if _MODEL_CONFIG.value else None,
      dtype=_DTYPE.value,
      fp8_export=_FP8.value,
      max_shard_bytes=int(_SHARD_GB.value * 1e9),
    )
    print(f"wrote {_HF_DIR.value}")


if __name__ == "__main__":
  app.run(main)
