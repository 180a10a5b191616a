# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Result rows (docs/benchmarks.md): the command reruns the measurement as it was made."""

import os
import sys

from experiments import bench_common


def test_row_command_carries_the_suite_switches(monkeypatch):
  for k in list(os.environ):
    if k.startswith(bench_common._ENV_PREFIXES):
      monkeypatch.delenv(k)
  monkeypatch.setattr(sys, "argv", ["bench.py", "--suite=E1", "--out=/tmp/e1.json"])
  monkeypatch.setenv("E1_PARTS", "1")
  monkeypatch.setenv("M1_ITERS", "2")
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  monkeypatch.setenv("UNRELATED_SETTING", "x")
  r = bench_common.row("E1", {"seq_len": 8}, 2.0, 4e12, baseline={"name": "b", "time_ms": 4.0})
  assert r["command"] == (
    "E1_PARTS=1 M1_ITERS=2 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 "
    "python -m experiments.bench --suite=E1 --out=/tmp/e1.json"
  )
  assert r["ratio"] == 2.0 and r["tflops"] == 2000.0 and r["suite"] == "E1"
  monkeypatch.delenv("E1_PARTS")
  monkeypatch.delenv("M1_ITERS")
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
  assert bench_common.command("experiments.bench_scaling") == (
    "python -m experiments.bench_scaling --suite=E1 --out=/tmp/e1.json"
  )


def test_device_op_times_names_the_ops_that_ran():
  # On CPU the trace has no device process: the host's events stand in (the GPU's kernels there).
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  got = bench_common.device_op_times(f, jnp.ones((256, 256)), iters=2, top=50)
  assert got["device_ms"] > 0 and got["ops"]
  assert abs(sum(o["share"] for o in got["ops"]) - 1.0) < 1e-6 or len(got["ops"]) == 50
  assert all(o["ms"] >= 0 and o["calls"] > 0 for o in got["ops"])
  assert any("PjitFunction" in o["name"] for o in got["ops"])  # the jitted call was traced


def test_m1_profile_table_reads_the_trace(tmp_path):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from experiments import bench_train  # noqa: PLC0415

  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((128, 128))
  jax.block_until_ready(f(x))
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    jax.block_until_ready(f(x))
  lines = bench_train._profile_table(str(tmp_path), 1, top=3).splitlines()
  assert lines[0] == "| op | ms per step | calls per step | share |"
  assert lines[-1].startswith("| (all GPU ops) |")
  assert len(lines) == 2 + 3 + 1  # header, three ops, total
  assert all(float(line.split("|")[3]) > 0 for line in lines[2:-1])  # calls per step
