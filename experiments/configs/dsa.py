# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""DSA phases: indexer warm-up (dense attention, KL, indexer only) and sparse training.

  python -m experiments.train --config=experiments/configs/dsa.py:phase=warmup,size=debug \
    --config.ckpt.init_from=/tmp/dense --workdir=/tmp/warmup
  python -m experiments.train --config=experiments/configs/dsa.py:phase=sparse,size=debug \
    --config.ckpt.init_from=/tmp/warmup --workdir=/tmp/sparse
"""

from experiments.configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, phase="warmup", size="debug")
  if arg.phase not in ("warmup", "sparse"):
    raise ValueError(f"phase={arg.phase!r}; dsa.py runs 'warmup' or 'sparse'")
  c = common.base_config(arg.phase, arg.size)
  if arg.size == "debug":
    c.model.index_topk = c.data.seq_len // 8  # real sparsity: k = L/8
  return c
