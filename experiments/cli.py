# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Console-script entry points (declared in setup.py): `dsa-train`, `dsa-convert`, `dsa-generate`,
`dsa-bench`, `dsa-demo`. Each imports its absl launcher (which defines the flags) and runs its
`main`, so `dsa-train ...` behaves like `python -m experiments.train ...` from any directory.

`--config` of `dsa-train` is a config file path (ml_collections). A path that does not exist from
the current directory is looked up among the installed configs by its file name, so
`--config=experiments/configs/dsa.py:phase=sparse`, `--config=dsa.py:phase=sparse` and
`--config=dsa:phase=sparse` all work outside the repository.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def resolve_config(value: str) -> str:
  """'experiments/configs/dsa.py:phase=x' -> the same, or the installed config's path if the file
  is not found from the current directory (a bare name like 'dsa' gets '.py')."""
  path, sep, arg = value.partition(":")
  if os.path.exists(path):
    return value
  name = os.path.basename(path)
  if not name.endswith(".py"):
    name += ".py"
  installed = os.path.join(CONFIGS_DIR, name)
  return installed + sep + arg if os.path.isfile(installed) else value


def resolve_config_argv(argv: list[str]) -> list[str]:
  """argv with every `--config=VALUE` / `--config VALUE` resolved (`--config.x=...` untouched)."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + resolve_config(a[len("--config=") :])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1])
  return out


def _run(module: str, config: bool = False):
  mod = importlib.import_module(module)  # defines the module's flags
  for f in flags.FLAGS.get_key_flags_for_module(mod.__name__):  # --help lists the main module's
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], f)
  argv = resolve_config_argv(sys.argv) if config else sys.argv
  app.run(mod.main, argv=argv)


def train():
  _run("experiments.train", config=True)


def convert():
  _run("experiments.convert_checkpoint")


def generate():
  _run("experiments.generate")


def bench():
  _run("experiments.bench")


def demo():
  _run("experiments.demo")
