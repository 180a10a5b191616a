# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""Training launcher: one phase per run.

  python -m experiments.train --config=experiments/configs/dsa.py:phase=sparse,size=test \
    --config.optim.lr=3e-4 --workdir=/tmp/run

Writes workdir/config.json (resolved), checkpoints/, metrics.jsonl, tb/ and result.json; rerunning
with the same workdir resumes exactly where it stopped.
"""

import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from dsa_jax import train
from experiments.configs import common

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "experiment config file", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory", required=True)
_COORD = flags.DEFINE_string("coordinator", None, "multi-host: coordinator address host:port")
_NPROC = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PID = flags.DEFINE_integer("process_id", None, "multi-host: this process's id")
_DIST = flags.DEFINE_bool(
  "distributed", False, "multi-host with auto-detected peers (TPU pod slice, SLURM, Open MPI)"
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  # Before any other jax call. TPU pods and SLURM/MPI jobs detect the coordinator and process ids
  # themselves (--distributed); elsewhere pass --coordinator/--num_processes/--process_id.
  if _COORD.value or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
  elif _DIST.value:
    jax.distributed.initialize()
  cfg = common.to_train_config(_CONFIG.value)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
      f.write(_CONFIG.value.to_json(indent=1))
  result = train.train(cfg, _WORKDIR.value)
  print(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=1))


if __name__ == "__main__":
  app.run(main)
