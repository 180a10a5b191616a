# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""HF DeepSeek-V3.2(-Exp) / V3.1 / V4 safetensors <-> dsa_jax Orbax params checkpoint.

  python -m experiments.convert_checkpoint --direction=hf_to_orbax --hf_dir=DIR --orbax_dir=DIR \
      [--arch=auto|v32|v4] [--dtype=fp32|bf16] [--config_overrides='{"index_topk": 2048}']
  python -m experiments.convert_checkpoint --direction=orbax_to_hf --orbax_dir=DIR --hf_dir=DIR \
      [--arch=auto|v32|v4] [--dtype=bf16|fp32] [--fp8_export] [--model_config=config.json] \
      [--layout=hub|transformers]

--arch: auto (default) takes the architecture from the HF config.json's model_type (hf_to_orbax),
or from what hf_to_orbax recorded, else --model_config's model_type (orbax_to_hf): deepseek_v4 is
V4 (dsa_jax.convert.deepseek_v4_hf, docs/v4.md §Conversion), deepseek_v32 / deepseek_v3 is V3.2
(dsa_jax.convert.deepseek_hf, docs/dsa.md §Checkpoints). An explicit --arch must agree with it.
hf_to_orbax: --dtype is the storage dtype (default fp32; FP8 / FP4 weights are dequantised). A
V3/V3.1 source (model_type deepseek_v3) gets freshly initialised indexers, ready for the warm-up.
orbax_to_hf: --dtype forces every non-quantised tensor's dtype (default: each tensor's source dtype,
else bf16); --fp8_export writes the release's quantised formats (V3.2: e4m3 Linear weights with
128x128 block scales; V4: the same with e8m0 scales, and FP4 routed experts), bit-exact for an
unchanged quantised import. --model_config (a ModelConfig / V4Config JSON or an HF config.json) is
needed only for checkpoints that hf_to_orbax did not write (e.g. `checkpoint.save_params`).
--layout (V4 only): hub (DeepSeek's names, the default for a new export) or transformers
(`DeepseekV4ForCausalLM.save_pretrained`'s names); default: the source's.
"""

import json
import os
import sys

from absl import app, flags, logging

from dsa_jax import convert, v4
from dsa_jax.config import ModelConfig
from dsa_jax.convert import deepseek_v4_hf

_DIRECTION = flags.DEFINE_enum("direction", None, ["hf_to_orbax", "orbax_to_hf"], "which way")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF directory (config.json, index, shards)")
_ORBAX_DIR = flags.DEFINE_string("orbax_dir", None, "Orbax params checkpoint directory")
_ARCH = flags.DEFINE_enum("arch", "auto", ["auto", "v32", "v4"], "see the module docstring")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bf16", "fp32"], "see the module docstring")
_FP8 = flags.DEFINE_bool("fp8_export", False, "orbax_to_hf: the release's FP8 (/ FP4) formats")
_LAYOUT = flags.DEFINE_enum("layout", None, ["hub", "transformers"], "orbax_to_hf, V4: names")
_MODEL_CONFIG = flags.DEFINE_string(
  "model_config", None, "orbax_to_hf: config JSON if not recorded"
)
_OVERRIDES = flags.DEFINE_string("config_overrides", None, "hf_to_orbax: config fields, JSON")
_SEED = flags.DEFINE_integer("seed", 0, "hf_to_orbax: seed of fresh indexers (V3.1 source)")
_INIT_IDX = flags.DEFINE_bool(
  "init_missing_indexers", False, "hf_to_orbax: initialise indexer tensors a V3.2 source lacks"
)
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "orbax_to_hf: shard size for a new layout")
flags.mark_flags_as_required(["direction", "hf_dir", "orbax_dir"])

_ARCH_OF_MODEL_TYPE = {"deepseek_v4": "v4", "deepseek_v32": "v32", "deepseek_v3": "v32"}


def _load_json(path):
  with open(path) as f:
    return json.load(f)


def _detected_arch() -> tuple[str | None, str]:
  """(arch from the files, where it came from)."""
  if _DIRECTION.value == "hf_to_orbax":
    path = os.path.join(_HF_DIR.value, "config.json")
    if os.path.isfile(path):
      mt = _load_json(path).get("model_type")
      return _ARCH_OF_MODEL_TYPE.get(mt), f"{path} model_type {mt!r}"
    return None, path
  record = os.path.join(_ORBAX_DIR.value, "hf_source", "convert.json")
  if os.path.isfile(record):
    arch = "v4" if _load_json(record).get("arch") == deepseek_v4_hf.ARCH else "v32"
    return arch, f"{record} (the recorded source's model_type)"
  if _MODEL_CONFIG.value:
    d = _load_json(_MODEL_CONFIG.value)
    if "model_type" in d:
      return _ARCH_OF_MODEL_TYPE.get(d["model_type"]), f"{_MODEL_CONFIG.value} model_type"
    return ("v4" if "compress_ratios" in d else "v32"), f"{_MODEL_CONFIG.value} fields"
  return None, "nothing (no recorded source, no --model_config)"


def _arch() -> str:
  found, where = _detected_arch()
  if _ARCH.value == "auto":
    if found is None:
      raise ValueError(f"cannot tell V3.2 from V4 from {where}: pass --arch=v32 or --arch=v4")
    return found
  if found is not None and found != _ARCH.value:
    raise ValueError(f"--arch={_ARCH.value} but {where} says {found} (model_type)")
  return _ARCH.value


def _model_config(path, arch):
  d = _load_json(path)
  if arch == "v4":
    if "model_type" in d:
      return deepseek_v4_hf.config_from_hf(d)
    return v4.V4Config(**{**d, "compress_ratios": tuple(d["compress_ratios"])})
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
  arch = _arch()
  overrides = json.loads(_OVERRIDES.value) if _OVERRIDES.value else None
  if _DIRECTION.value == "hf_to_orbax":
    if arch == "v4":
      cfg = deepseek_v4_hf.hf_to_orbax(
        _HF_DIR.value, _ORBAX_DIR.value, dtype=_DTYPE.value or "fp32", overrides=overrides
      )
    else:
      cfg = convert.hf_to_orbax(
        _HF_DIR.value,
        _ORBAX_DIR.value,
        dtype=_DTYPE.value or "fp32",
        overrides=overrides,
        seed=_SEED.value,
        init_missing_indexers=_INIT_IDX.value,
      )
    print(f"wrote {_ORBAX_DIR.value}: {cfg}")
    return
  cfg = _model_config(_MODEL_CONFIG.value, arch) if _MODEL_CONFIG.value else None
  if arch == "v4":
    deepseek_v4_hf.orbax_to_hf(
      _ORBAX_DIR.value,
      _HF_DIR.value,
      cfg=cfg,
      dtype=_DTYPE.value,
      quantized=_FP8.value,
      layout=_LAYOUT.value,
      max_shard_bytes=int(_SHARD_GB.value * 1e9),
    )
  else:
    if _LAYOUT.value is not None:
      raise ValueError("--layout applies to V4 checkpoints only")
    convert.orbax_to_hf(
      _ORBAX_DIR.value,
      _HF_DIR.value,
      cfg=cfg,
      dtype=_DTYPE.value,
      fp8_export=_FP8.value,
      max_shard_bytes=int(_SHARD_GB.value * 1e9),
    )
  print(f"wrote {_HF_DIR.value}")


if __name__ == "__main__":
  app.run(main)
