# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Shared config sections and the ConfigDict -> dataclass conversion (the launchers' one boundary).

Model sizes live in one table, `dsa_jax.config.PRESETS`; a config's `model` section holds every
ModelConfig field of its preset (so each is overridable: `--config.model.<field>=`) plus the
preset's name. The other sections are built from the library dataclasses' own defaults. Every
launcher (experiments/train.py, demo.py, reproduce.py) turns its ConfigDict into the library's
`TrainConfig` with `to_train_config`.
"""

import dataclasses

import ml_collections

from dsa_jax import config as model_config
from dsa_jax import data, optim, train, v4

# The long-context sizes compute the cross-entropy 8192 tokens at a time (TrainConfig.loss_chunk):
# whole [T, V] f32 logits and their gradient are 2 x 8.6 GB at 64K tokens and a 32K vocabulary;
# with them v32_attn's 64K sparse step under "save_attention" did not fit an 80 GB H100, and with
# chunks it ran on an H200 at 78.4 GiB (WORKSPACE.md, 2026-12-06).
SIZES = {
  # size: (preset, model overrides, data overrides, steps, run overrides)
  "test": ("test", {}, dict(seq_len=64, batch_size=2), 1, {}),
  "debug": ("debug", {}, dict(seq_len=1024, batch_size=4), 200, {}),
  "1b": ("1b", {"impl": "pallas"}, dict(seq_len=32768, batch_size=1), 1000, dict(loss_chunk=8192)),
  # V3.2's attention (128 heads, its MLA and indexer) in 2 layers: the M1 benchmark's preset
  "v32_attn": (
    "v32_attn",
    {"impl": "pallas"},
    dict(seq_len=65536, batch_size=1),
    1000,
    dict(loss_chunk=8192),
  ),
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'phase=sparse,size=test' -> ConfigDict with `defaults` (unknown keys are errors)."""
  out = dict(defaults)
  for kv in (arg or "").split(","):
    if not kv:
      continue
    if "=" not in kv:
      raise ValueError(f"config arg {kv!r} must be key=value")
    k, v = kv.split("=", 1)
    if k not in defaults:
      raise ValueError(f"config arg {k!r} unknown; expected one of {sorted(defaults)}")
    out[k] = (
      type(defaults[k])(v) if not isinstance(defaults[k], bool) else v in ("1", "true", "True")
    )
  return ml_collections.ConfigDict(out)


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
  """Every model-config field of `preset` (with `overrides`) and `preset`, the name: a V3.2
  `ModelConfig` (dsa_jax.config.PRESETS) or a DeepSeek-V4 `V4Config` (dsa_jax.v4.PRESETS)."""
  build = v4.preset if preset in v4.PRESETS else model_config.preset
  fields = build(preset, **overrides).to_dict()
  return ml_collections.ConfigDict({"preset": preset, **fields})


def model_config_of(c: ml_collections.ConfigDict):
  """The typed model config of a `model` section (V4Config for a V4 preset)."""
  m = {k: v for k, v in dict(c).items() if k != "preset"}
  if c.get("preset") in v4.PRESETS:
    m = {k: tuple(v) if isinstance(v, list) else v for k, v in m.items()}
    return v4.V4Config(**m)
  return model_config.ModelConfig(**m)


def _section(cls, **overrides) -> ml_collections.ConfigDict:
  """A dataclass's fields at their defaults; an optional path (default None) is '' here."""
  d = {f.name: f.default for f in dataclasses.fields(cls)}
  d = {k: "" if v is None else v for k, v in d.items()}
  d.update(overrides)
  return ml_collections.ConfigDict(d)


def make_config(
  phase: str, preset: str, steps: int, model: dict | None = None, data_: dict | None = None
) -> ml_collections.ConfigDict:
  """A one-phase training config: `preset`'s model (with `model` overrides), the phase's
  fields, and the library defaults for optimizer, data (with `data_`), checkpoints and the run."""
  if phase not in train.PHASES:
    raise ValueError(f"phase={phase!r}; expected one of {sorted(train.PHASES)}")
  model = {k: v for k, v in (model or {}).items() if k != "preset"}
  c = ml_collections.ConfigDict()
  c.model = model_section(preset, **model)
  c.phase = ml_collections.ConfigDict(dataclasses.asdict(train.phase(phase)))
  # warmup_steps / total_steps unset: derived from `steps` (max(1, steps // 20) and steps), so
  # --config.steps moves the whole LR schedule; set them to fix the schedule on purpose.
  c.optim = _section(
    optim.OptimConfig,
    lr=3e-3 if phase != "sparse" else 1e-3,
    warmup_steps=ml_collections.config_dict.placeholder(int),
    total_steps=ml_collections.config_dict.placeholder(int),
  )
  c.data = _section(data.DataConfig, **(data_ or {}))
  c.ckpt = _section(train.CkptConfig)
  run = {f.name: f.default for f in dataclasses.fields(train.TrainConfig)}
  for f in ("model", "phase", "optim", "data", "ckpt", "mesh", "rules"):
    del run[f]
  c.update(
    run
  )  # steps, seed, log_every, eval_*, progress, nan_policy (stop|skip), loss_chunk, init
  c.steps = steps
  c.log_every = 10 if steps >= 10 else 1
  # every mesh axis present so that --config.mesh.fsdp=4 works on the locked config
  c.mesh = ml_collections.ConfigDict(
    {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1, "sequence": 1}
  )
  c.rules = ml_collections.ConfigDict({})  # overrides of sharding.DEFAULT_RULES
  return c


def base_config(phase: str, size: str) -> ml_collections.ConfigDict:
  """`make_config` at one of the launcher's `SIZES`."""
  if size not in SIZES:
    raise ValueError(f"size={size!r}; expected one of {sorted(SIZES)}")
  preset, model_over, data_over, steps, run_over = SIZES[size]
  c = make_config(phase, preset, steps, model=model_over, data_=data_over)
  c.update(run_over)
  return c


def to_train_config(c: ml_collections.ConfigDict) -> train.TrainConfig:
  """The one place where experiment ConfigDicts become the library's typed dataclasses."""
  none_if_empty = lambda d, *keys: {**d, **{k: d[k] or None for k in keys}}
  run = {f.name for f in dataclasses.fields(train.TrainConfig)}
  run -= {"model", "phase", "optim", "data", "ckpt", "mesh", "rules"}
  return train.TrainConfig(
    model=model_config_of(c.model),
    phase=train.PhaseConfig(**dict(c.phase)),
    optim=optim.OptimConfig(**optim_fields(c)),
    data=data.DataConfig(**none_if_empty(dict(c.data), "path", "tokenizer")),
    ckpt=train.CkptConfig(**none_if_empty(dict(c.ckpt), "init_from")),
    # axes of size 1 are left out (sharding.make_mesh adds every axis, size 1 when unused)
    mesh=tuple((k, v) for k, v in dict(c.mesh).items() if v != 1 or k == "data"),
    rules=tuple(
      (k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(c.rules).items()
    )
    or None,
    **{k: c[k] for k in run if k in c},
  )


def optim_fields(c: ml_collections.ConfigDict) -> dict:
  """c.optim with an unset (None) warmup_steps / total_steps derived from c.steps."""
  o = dict(c.optim)
  if o.get("total_steps") is None:
    o["total_steps"] = c.steps
  if o.get("warmup_steps") is None:
    o["warmup_steps"] = max(1, c.steps // 20)
  return o
