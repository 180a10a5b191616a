# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Helpers of the V3.2 and V4 conversion tests (test_convert.py, v4/test_convert.py)."""

import filecmp
import os
import subprocess
import sys

import numpy as np

from dsa_jax import checkpoint

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def flat(m):
  """A model's parameters {path tuple: np.ndarray}."""
  return {k: np.asarray(v) for k, v in checkpoint._flat(checkpoint.params_dict(m)).items()}


def same_dirs(a, b):
  """Asserts both directories hold the same file names with the same bytes."""
  names = sorted(os.listdir(a))
  assert names == sorted(os.listdir(b))
  diff = [n for n in names if not filecmp.cmp(os.path.join(a, n), os.path.join(b, n), False)]
  assert not diff, f"files differ: {diff}"


def leftovers(parent):
  """Hidden (temporary) entries a conversion left in parent."""
  return [n for n in os.listdir(parent) if n.startswith(".")]


def convert_cli(*args, check=True):
  """Runs `python -m experiments.convert_checkpoint args` on CPU; the CompletedProcess."""
  return subprocess.run(
    [sys.executable, "-m", "experiments.convert_checkpoint", *args],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    check=check,
  )
