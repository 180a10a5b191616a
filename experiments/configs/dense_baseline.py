# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""The control: the same model with dense attention and the indexer unused.

  python -m experiments.train --config=experiments/configs/dense_baseline.py:size=debug \
    --workdir=/tmp/dense
"""

from experiments.configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, size="debug")
  return common.base_config("dense", arg.size)
