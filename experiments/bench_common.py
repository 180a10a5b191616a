# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Benchmark plumbing shared by the suites: timing, result rows, files (docs/benchmarks.md)."""

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np


def time_fn(fn, *args, warmup: int = 2, iters: int = 10):
  """Median wall time in ms of fn(*args) after warm-up (compilation excluded), blocking on results."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return float(np.median(times))


def device_op_times(fn, *args, iters: int = 3, top: int = 25) -> dict:
  """Per-kernel device time of fn(*args), from a profiler trace of `iters` calls after one
  warm-up call (see trace_op_times)."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(iters):
        jax.block_until_ready(fn(*args))
    return trace_op_times(d, iters, top)


def trace_op_times(trace_dir: str, calls: int, top: int = 25) -> dict:
  """The Perfetto trace that jax.profiler wrote under trace_dir, per call of `calls`:
  {"device_ms": device time, summed over kernels (overlapping streams add up), "ops": [{"name",
  "ms", "calls", "share"}] the `top` kernels by time}. Device events are those of the trace's
  "/device:" processes; on CPU (none) the host's ops stand in."""
  (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs = {
    e["pid"]: e["args"]["name"]
    for e in events
    if e.get("ph") == "M" and e.get("name") == "process_name"
  }
  on_device = {pid for pid, name in procs.items() if name.startswith("/device:")}
  keep = on_device or set(procs)
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in keep and not e["name"].startswith("$"):
      total[e["name"]] += e.get("dur", 0.0) / 1e3 / calls
      count[e["name"]] += 1 / calls
  device_ms = sum(total.values())
  ops = [
    {"name": n[:160], "ms": ms, "calls": count[n], "share": ms / device_ms if device_ms else 0.0}
    for n, ms in total.most_common(top)
  ]
  return {"device_ms": device_ms, "ops": ops}


def rel_err(out, ref) -> float:
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def commit() -> str:
  """DSA_COMMIT when set (a device copy's git metadata can be stale), else git's HEAD."""
  if os.environ.get("DSA_COMMIT"):
    return os.environ["DSA_COMMIT"]
  try:
    return subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
  except Exception:  # noqa: BLE001 - no git on the device copy is fine, say so
    return os.environ.get("DSA_COMMIT", "unknown")


# Environment variables that change what a suite measures (the suites' switches and JAX's GPU
# memory settings): a row's command carries the ones that are set, so it reruns as measured.
_ENV_PREFIXES = ("E1_", "M1_", "DSA_BENCH_", "XLA_PYTHON_CLIENT_")


def command(module: str = "experiments.bench") -> str:
  """This process's command line as `VAR=value ... python -m module args`, with the suite
  switches set in the environment."""
  env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)]
  return " ".join(env + ["python", "-m", module] + sys.argv[1:])


def row(suite: str, shape: dict, time_ms: float, flops: float | None, **extra) -> dict:
  """One result row (docs/benchmarks.md §Result format); `ratio` is set when `baseline` is given."""
  r = {
    "suite": suite,
    "date": datetime.date.today().isoformat(),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "commit": commit(),
    "command": command(),
    "shape": shape,
    "time_ms": time_ms,
    "tflops": (flops / (time_ms * 1e-3) / 1e12) if flops else None,
  }
  r.update(extra)
  base = r.get("baseline")
  if base and base.get("time_ms"):
    r["ratio"] = base["time_ms"] / time_ms
  return r


def write_results(path: str, rows: list[dict]):
  """Appends rows to experiments/results/<name>.json ({"results": [...]})."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  old = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f).get("results", [])
  with open(path + ".tmp", "w") as f:
    json.dump({"results": old + rows}, f, indent=1)
  os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------- sweep scripts
def sweep_args(budget_s: float) -> tuple[argparse.Namespace, dict]:
  """The sweep scripts' command line (--out, --small: tiny shapes, CPU interpret; --only: case
  names; --budget_s: cases after it are skipped) and the run's start, interpret and case set."""
  t_start = time.perf_counter()
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--small", action="store_true", help="tiny shapes in CPU interpret mode")
  ap.add_argument("--only", default="", help="comma-separated case names (all if empty)")
  ap.add_argument("--budget_s", type=float, default=budget_s, help="stop starting cases after this")
  a = ap.parse_args()
  run = dict(
    t_start=t_start,
    interpret=a.small and jax.default_backend() == "cpu",
    only=set(filter(None, a.only.split(","))),
  )
  return a, run


def write_sweep(module: str, args: argparse.Namespace, t_start: float, meta: dict, rows: dict):
  """{"meta": date, device, jax, commit, command, total_s and `meta`; **rows} to args.out."""
  head = {
    "date": datetime.date.today().isoformat(),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "commit": commit(),
    "command": command(f"experiments.{module}"),
  }
  head.update(meta, total_s=time.perf_counter() - t_start)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"meta": head, **rows}, f, indent=1)
  print(f"wrote {args.out} in {head['total_s']:.0f} s")
