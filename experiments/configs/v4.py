# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""DeepSeek-V4's three training stages (docs/v4.md §Training), one run per stage.

  python -m experiments.train --config=experiments/configs/v4.py:phase=dense,size=debug \
    --workdir=/tmp/v4_dense
  python -m experiments.train --config=experiments/configs/v4.py:phase=warmup,size=debug \
    --config.ckpt.init_from=/tmp/v4_dense --workdir=/tmp/v4_warmup
  python -m experiments.train --config=experiments/configs/v4.py:phase=sparse,size=debug \
    --config.ckpt.init_from=/tmp/v4_warmup --workdir=/tmp/v4_sparse

phase: dense (stage 1: CSA over every visible entry, indexer off), warmup (stage 2: indexer
only, KL over every visible entry), sparse (stage 3: top-k, KL over the selection).
size: test (v4_test, L=64, 1 step), debug (v4_test, L=1024, top-k 32 of up to 256 entries, 200
steps), flash (DeepSeek-V4-Flash, L=4096; a pod-scale run: set --config.mesh.*).
"""

from experiments.configs import common

SIZES = {
  # size: (preset, model overrides, data overrides, steps)
  "test": ("v4_test", {}, dict(seq_len=64, batch_size=2), 1),
  "debug": (
    "v4_test",
    {"index_topk": 32, "max_seq_len": 1024},
    dict(seq_len=1024, batch_size=4),
    200,
  ),
  "flash": ("v4_flash", {}, dict(seq_len=4096, batch_size=1), 1000),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, phase="dense", size="test")
  if arg.size not in SIZES:
    raise ValueError(f"size={arg.size!r}; expected one of {sorted(SIZES)}")
  preset, model, data_, steps = SIZES[arg.size]
  return common.make_config(arg.phase, preset, steps, model=model, data_=data_)
