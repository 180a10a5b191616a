# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Shared config sections and the ConfigDict -> dataclass conversion (the launcher's one boundary)."""

import ml_collections

from dsa_jax import config as model_config
from dsa_jax import data, optim, train

SIZES = {
  # size: (preset, model overrides, data overrides, steps)
  "test": ("test", {}, dict(seq_len=64, batch_size=2), 1),
  "debug": ("debug", {}, dict(seq_len=1024, batch_size=4), 200),
  "1b": ("1b", {"impl": "pallas"}, dict(seq_len=32768, batch_size=1), 1000),
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


def base_config(phase: str, size: str) -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise ValueError(f"size={size!r}; expected one of {sorted(SIZES)}")
  preset, model_over, data_over, steps = SIZES[size]
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict({"preset": preset, **model_over})
  # every ModelConfig field is overridable from the command line
  for f, v in model_config.PRESETS[preset].items():
    c.model[f] = v
  for f in ("index_topk", "indexer_dtype", "impl", "remat", "attn_block_q", "n_mtp_layers"):
    if f not in c.model:
      c.model[f] = getattr(model_config.ModelConfig(), f)
  c.model.update(model_over)
  c.phase = ml_collections.ConfigDict(train.PHASES[phase])
  # warmup_steps / total_steps unset: derived from `steps` (max(1, steps // 20) and steps), so
  # --config.steps moves the whole LR schedule; set them to fix the schedule on purpose.
  c.optim = ml_collections.ConfigDict(
    dict(
      lr=3e-3 if phase != "sparse" else 1e-3,
      warmup_steps=ml_collections.config_dict.placeholder(int),
      total_steps=ml_collections.config_dict.placeholder(int),
      min_lr_ratio=0.1,
      b1=0.9,
      b2=0.95,
      weight_decay=0.1,
      grad_clip=1.0,
    )
  )
  c.data = ml_collections.ConfigDict(
    dict(
      source="mixed",
      seq_len=1024,
      batch_size=8,
      seed=0,
      passkey_share=0.25,
      mqar_share=0.125,
      mqar_pairs=16,
      path="",
      tokenizer="",
    )
  )
  c.data.update(data_over)
  c.ckpt = ml_collections.ConfigDict(dict(every=100, keep=3, async_save=True, init_from=""))
  c.steps = steps
  c.seed = 0
  c.log_every = 10 if steps >= 10 else 1
  c.eval_every = 0
  c.eval_batches = 2
  c.eval_metrics = True
  # every mesh axis present so that --config.mesh.fsdp=4 works on the locked config
  c.mesh = ml_collections.ConfigDict(
    {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1, "sequence": 1}
  )
  c.rules = ml_collections.ConfigDict({})
  c.progress = True
  c.nan_policy = "stop"  # or "skip": skip the update of a step with a non-finite loss / gradient
  c.init = "auto"  # parameter init: auto | host | sharded (see TrainConfig.init)
  return c


def to_train_config(c: ml_collections.ConfigDict) -> train.TrainConfig:
  """The one place where experiment ConfigDicts become the library's typed dataclasses."""
  m = dict(c.model)
  m.pop("preset")
  d = dict(c.data)
  d["path"] = d["path"] or None
  d["tokenizer"] = d["tokenizer"] or None
  return train.TrainConfig(
    model=model_config.ModelConfig(**m),
    phase=train.PhaseConfig(**dict(c.phase)),
    optim=optim.OptimConfig(**optim_fields(c)),
    data=data.DataConfig(**d),
    ckpt=train.CkptConfig(**{**dict(c.ckpt), "init_from": c.ckpt.init_from or None}),
    steps=c.steps,
    seed=c.seed,
    log_every=c.log_every,
    eval_every=c.eval_every,
    eval_batches=c.eval_batches,
    eval_metrics=c.eval_metrics,
    mesh=tuple(dict(c.mesh).items()),
    rules=tuple(
      (k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(c.rules).items()
    )
    or None,
    progress=c.progress,
    nan_policy=c.get("nan_policy", "stop"),
    init=c.get("init", "auto"),
  )


def optim_fields(c: ml_collections.ConfigDict) -> dict:
  """c.optim with an unset (None) warmup_steps / total_steps derived from c.steps."""
  o = dict(c.optim)
  if o.get("total_steps") is None:
    o["total_steps"] = c.steps
  if o.get("warmup_steps") is None:
    o["warmup_steps"] = max(1, c.steps // 20)
  return o
