# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""Text generation from a trained model (byte-level prompts, as the training data).

  python -m experiments.generate --ckpt=/tmp/sparse --prompt="def main(" --max_new_tokens=64
  python -m experiments.generate --preset=test --prompt=a --prompt="import os" \
    --attention=dense --fp8_cache --temperature=0.8 --top_p=0.95

--ckpt: a training workdir (its model_config.json gives the model; latest checkpoint, or DIR@STEP) or a
params checkpoint directory (the config `convert_checkpoint` recorded in hf_source/convert.json,
else --preset gives the model). Without --ckpt: a random model of --preset (a smoke run). Each
--prompt is one request of the batch. A bad --ckpt or flag prints one line and exits 2.
DeepSeek-V4 runs the same way (a V4 preset such as `--preset=v4_test`, a V4 training workdir, or
a V4 checkpoint converted by `dsa-convert`): window rings, compressor states and compressed
caches (docs/v4.md §Decoding); --fp8_cache needs the config's kv_quant="fp8".
"""

import json
import os
import sys
import time

from absl import app, flags, logging

import dsa_jax
from dsa_jax import generate, model, train, v4

_PRESET = flags.DEFINE_string("preset", "test", "model preset when --ckpt has no model_config.json")
_CKPT = flags.DEFINE_string("ckpt", None, "training workdir[@step] or params checkpoint dir")
_PROMPT = flags.DEFINE_multi_string("prompt", ["def main("], "prompt text (repeat for a batch)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate per prompt")
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
_ATTN = flags.DEFINE_enum("attention", "sparse", list(generate.ATTENTION), "dense MLA or DSA")
_FP8 = flags.DEFINE_bool("fp8_cache", False, "FP8 latent + indexer caches (DeepSeek's layouts)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


def _config(d: dict) -> dsa_jax.ModelConfig | v4.V4Config:
  """A recorded config dict: V4 (it has compress_ratios) or V3.2."""
  if "compress_ratios" in d:
    return v4.V4Config(**{**d, "compress_ratios": tuple(d["compress_ratios"])})
  return dsa_jax.ModelConfig.from_dict(d)


def model_config(ckpt: str | None, preset: str) -> dsa_jax.ModelConfig | v4.V4Config:
  """The recorded model config: a training workdir's model_config.json (written by
  dsa_jax.train.train for every run) or a converted checkpoint's hf_source/convert.json; else the
  preset (V3.2 or V4)."""
  if ckpt:
    root = ckpt.rsplit("@", 1)[0]
    mpath = os.path.join(root, "model_config.json")  # written by train.train
    if os.path.exists(mpath):
      with open(mpath) as f:
        return _config(json.load(f))
    cpath = os.path.join(root, "hf_source", "convert.json")  # written by hf_to_orbax
    if os.path.exists(cpath):
      with open(cpath) as f:
        return _config(json.load(f)["model_config"])
  return v4.preset(preset) if preset in v4.PRESETS else dsa_jax.preset(preset)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax / absl INFO chatter only on request
    logging.set_verbosity(logging.WARNING)
  try:
    cfg = model_config(_CKPT.value, _PRESET.value)
    if cfg.vocab_size < 256:
      raise ValueError(f"vocab_size={cfg.vocab_size} < 256: prompts are byte tokens")
    m = train.load_init_params(_CKPT.value, cfg) if _CKPT.value else model.build(cfg)
  except (ValueError, KeyError, OSError, TypeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  gen = generate.GenerateConfig(
    max_new_tokens=_MAX_NEW.value,
    attention=_ATTN.value,
    fp8_cache=_FP8.value,
    temperature=_TEMP.value,
    top_p=_TOP_P.value,
    seed=_SEED.value,
  )
  prompts = [list(p.encode("utf-8")) for p in _PROMPT.value]
  t0 = time.perf_counter()
  try:
    out = generate.generate(m, prompts, gen)
  except ValueError as e:  # e.g. --fp8_cache on a V4 config without kv_quant="fp8"
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  dt = time.perf_counter() - t0
  for p, toks in zip(_PROMPT.value, out):
    text = bytes(t for t in toks if t < 256).decode("utf-8", errors="replace")
    print(json.dumps({"prompt": p, "completion": text, "tokens": toks}))
  n = sum(len(t) for t in out)
  print(f"# {n} tokens in {dt:.2f}s incl. compilation ({_ATTN.value}, fp8_cache={_FP8.value})")


if __name__ == "__main__":
  app.run(main)
