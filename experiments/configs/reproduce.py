# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""Small-scale reproduction of the DSA claim (WORKSPACE.md "Reproduction protocol").

  python -m experiments.reproduce --config=experiments/configs/reproduce.py:size=h200 \
    --workdir=/tmp/repro --stage=pretrain      # then dense, warmup, sparse, eval, report

size=h200: the `repro_h200` preset (dsa_jax.config.PRESETS: a 51.8M-parameter V3.2-shaped model,
64x128 FP8 indexer, MoE, MLA), L=16384, top-k=2048 (= L/8), stages of a few minutes each on one
H200. size=cpu: the `repro_cpu` preset, the same pipeline at L=512 (tests).
"""

import ml_collections

from experiments.configs import common

SIZES = {
  # the model: dsa_jax.config.PRESETS["repro_<size>"]
  "h200": dict(
    seq_len=16384,
    batch_size=2,
    # sized to the device time left in the session (H200 probe: 1.4 s/step dense, 3.9 warm-up)
    steps=dict(pretrain=48, warmup=5, sparse=15),
    eval=dict(
      text_rows=4,
      passkey_distances=(64, 2048, 4096, 8192, 16000),
      mqar_distances=(16, 2048, 4096, 8192, 15000),
      per_distance=4,
      buckets=(0, 256, 1024, 2048, 4096, 8192, 16384),
    ),
  ),
  "cpu": dict(
    seq_len=512,
    batch_size=1,
    steps=dict(pretrain=3, warmup=2, sparse=2),
    eval=dict(
      text_rows=1,
      passkey_distances=(16, 400),
      mqar_distances=(16, 400),
      per_distance=1,
      buckets=(0, 64, 256, 512),
    ),
  ),
}


def get_config(arg=None):
  size = "h200"
  for kv in (arg or "").split(","):
    if kv:
      k, _, v = kv.partition("=")
      if k != "size":
        raise ValueError(f"config arg {k!r} unknown; expected size=<{'|'.join(SIZES)}>")
      size = v
  if size not in SIZES:
    raise ValueError(f"size={size!r}; expected one of {sorted(SIZES)}")
  s = SIZES[size]
  c = ml_collections.ConfigDict()
  c.size = size
  c.model = common.model_section(f"repro_{size}")  # every ModelConfig field overridable
  c.seq_len = s["seq_len"]
  c.batch_size = s["batch_size"]
  c.seed = 0
  # Token budgets: branch A (dense) runs warmup + sparse steps, so both branches see equal tokens.
  c.steps = ml_collections.ConfigDict(s["steps"])
  c.lr = ml_collections.ConfigDict(dict(pretrain=3e-3, dense=1e-3, warmup=3e-3, sparse=1e-3))
  # Training mix: stdlib text with pass-key and MQAR rows (long-range tasks to learn retrieval).
  c.data = ml_collections.ConfigDict(dict(passkey_share=0.2, mqar_share=0.1, mqar_pairs=16))
  c.eval = ml_collections.ConfigDict(s["eval"])
  c.eval.passkey_distances = tuple(c.eval.passkey_distances)
  c.eval.mqar_distances = tuple(c.eval.mqar_distances)
  c.eval.buckets = tuple(c.eval.buckets)
  return c
