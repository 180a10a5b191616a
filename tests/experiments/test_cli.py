# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The installed tools: console scripts declared, launchers importable outside the repository."""

import importlib.metadata
import os
import subprocess
import sys

from experiments import cli

SCRIPTS = ("dsa-train", "dsa-convert", "dsa-generate", "dsa-bench", "dsa-demo")


def _env():
  env = dict(os.environ)
  env.pop("PYTHONPATH", None)  # only the installed package may provide experiments
  return env


def test_console_scripts_declared():
  eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")}
  for name in SCRIPTS:
    assert name in eps, f"{name} not installed (pip install -e .)"
    assert eps[name].value.startswith("experiments.cli:"), eps[name].value
    assert callable(eps[name].load())


def test_config_path_resolves_outside_the_repo(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  dsa = os.path.join(cli.CONFIGS_DIR, "dsa.py")
  for given in ("experiments/configs/dsa.py", "dsa.py", "dsa"):
    assert cli.resolve_config(given + ":phase=sparse") == dsa + ":phase=sparse"
  argv = cli.resolve_config_argv(["x", "--config", "dsa", "--config.steps=2"])
  assert argv == ["x", "--config", dsa, "--config.steps=2"]
  (tmp_path / "mine.py").write_text("")
  assert cli.resolve_config("mine.py:a=1") == "mine.py:a=1"  # an existing path is kept
  assert cli.resolve_config("nope.py") == "nope.py"  # ml_collections reports the error


def test_launcher_and_script_run_from_another_directory(tmp_path):
  script = os.path.join(os.path.dirname(sys.executable), "dsa-train")
  for cmd in ([sys.executable, "-m", "experiments.train", "--help"], [script, "--help"]):
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert "--workdir" in r.stdout + r.stderr, (cmd, r.stdout[-2000:], r.stderr[-2000:])
