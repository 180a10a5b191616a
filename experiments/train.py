# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""Training launcher: one phase per run.

  python -m experiments.train --config=experiments/configs/dsa.py:phase=sparse,size=test \
    --config.optim.lr=3e-4 --workdir=/tmp/run

Writes workdir/config.<n>.json (the resolved config of each run), checkpoints/, metrics.jsonl,
tb/ and result.json; rerunning with the same workdir resumes exactly where it stopped (a changed
model, phase, batch size or sequence length is refused unless --allow_config_change).

Exit codes: 0 done; 2 a user error (config, flags, workdir, refused resume, no usable checkpoint),
one line on stderr (--verbosity=1 adds the traceback); 3 a non-finite loss, gradient or parameter
(nothing non-finite is saved; --config.nan_policy=skip skips such steps instead); 143 / 130
stopped by SIGTERM / SIGINT after saving (rerun the same command to resume).
"""

import json
import os
import signal
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dsa_jax import train
from experiments.configs import common

EXIT_ERROR, EXIT_NONFINITE = 2, 3

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "experiment config file", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory", required=True)
_ALLOW = flags.DEFINE_bool(
  "allow_config_change", False, "resume a workdir with another model, phase, batch or seq_len"
)
_COORD = flags.DEFINE_string("coordinator", None, "multi-host: coordinator address host:port")
_NPROC = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PID = flags.DEFINE_integer("process_id", None, "multi-host: this process's id")
_DIST = flags.DEFINE_bool(
  "distributed", False, "multi-host with auto-detected peers (TPU pod slice, SLURM, Open MPI)"
)


def _config_overrides(argv) -> list[str]:
  return [a[2:].split("=", 1)[0][len("config.") :] for a in argv if a.startswith("--config.")]


def _one_line_config_errors(holder):
  """An unknown top-level --config.x makes ml_collections raise AttributeError (three chained
  tracebacks); turned into a flags error, which absl prints as one line."""
  flag = flags.FLAGS[holder.name]
  parse = flag._parse

  def _parse(argument):
    try:
      return parse(argument)
    except flags.Error:
      raise
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      try:
        cfg = flag.parser.parse(argument)
      except Exception:  # noqa: BLE001 - the config file itself failed: report that
        raise flags.IllegalFlagValueError(f"{argument}: {e}") from None
      unknown = [p for p in _config_overrides(sys.argv) if not _has_path(cfg, p)]
      if unknown:
        raise flags.IllegalFlagValueError(
          f"unknown config field(s) {', '.join('--config.' + p for p in unknown)}; "
          f"the config's top-level fields are {sorted(cfg.keys())}"
        ) from None
      raise flags.IllegalFlagValueError(f"{type(e).__name__}: {e}") from None

  flag._parse = _parse


def _has_path(cfg, path: str) -> bool:
  node = cfg
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


_one_line_config_errors(_CONFIG)


def _quiet_logs():
  """Orbax / absl INFO chatter off unless --verbosity was given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _fail(e: BaseException, code: int):
  if logging.get_verbosity() >= 1:
    traceback.print_exc()
  print(f"error: {e}", file=sys.stderr, flush=True)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  _quiet_logs()
  if _CONFIG.value is None:
    print(
      "error: --config is required, e.g. --config=experiments/configs/dsa.py:phase=sparse,size=test",
      file=sys.stderr,
    )
    sys.exit(EXIT_ERROR)
  # Before any other jax call. TPU pods and SLURM/MPI jobs detect the coordinator and process ids
  # themselves (--distributed); elsewhere pass --coordinator/--num_processes/--process_id.
  if _COORD.value or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
  elif _DIST.value:
    jax.distributed.initialize()
  sys.exit(run(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW.value))


def run(config, workdir: str, allow_config_change: bool = False) -> int:
  """Trains `config` (a ConfigDict) in workdir; prints the result, or one line for an error;
  returns the exit code (see the module docstring)."""
  try:
    cfg = common.to_train_config(config)
    result = train.train(cfg, workdir, allow_config_change=allow_config_change)
  except train.NonFiniteError as e:
    _fail(e, EXIT_NONFINITE)
  except (ValueError, TypeError) as e:  # the library's user errors (config, workdir, ckpt)
    _fail(e, EXIT_ERROR)
  print(json.dumps(result, indent=1))
  if result["preempted"]:
    signum = int(getattr(signal, result["signal"]))
    print(
      f"stopped by {result['signal']} at step {result['step']}, saved; rerun the same command "
      "to resume",
      file=sys.stderr,
    )
    return 128 + signum
  return 0


if __name__ == "__main__":
  app.run(main)
