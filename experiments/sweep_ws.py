# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sweep of the Mosaic GPU sparse-MLA forward configs (ops.GpuConfig) at S1 shapes.

  python -m experiments.sweep_ws --out=experiments/results/sweep_ws.json   # H200, ~2 min

Each case runs in its own subprocess with a time limit, so a case that deadlocks (a warpgroup
waiting on a barrier or on registers that never come) is recorded as such and the sweep goes on.
Cases: the default ("direct" copies), its split="halves" alternative (the two compute warpgroups
split the logits of a chunk instead of both computing them) and the "staged" fallback with 1, 2
or 4 copy warpgroups at top-k 2048, and the fallback at top-k 4096, where it is what
GpuConfig.default_for picks.
rel_err is vs the XLA gather reference on the same inputs.
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import time

CASES = {  # name: (top-k, GpuConfig kwargs)
  "direct": (2048, {}),  # the default
  "halves": (2048, {"split": "halves"}),  # the logits split between the compute WGs
  "staged": (2048, {"copies": "staged"}),
  "staged_copy2": (2048, {"copies": "staged", "copy_wgs": 2}),
  "staged_copy4": (2048, {"copies": "staged", "copy_wgs": 4}),
  "k4096_staged": (4096, {"copies": "staged"}),
  "k4096_staged_copy2": (4096, {"copies": "staged", "copy_wgs": 2}),  # = default_for at this k
}
S1 = dict(s_q=4096, s_kv=32768, h=128, d_qk=576, d_v=512, topk=2048)


def _one(name):
  import functools  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from experiments import bench_common, bench_sparse_mla  # noqa: PLC0415
  from pallas_kernels.sparse_mla import ops  # noqa: PLC0415

  topk, kw = CASES[name]
  shp = dict(S1, topk=topk)
  q, kv, idx = bench_sparse_mla._inputs(shp)
  op = functools.partial(ops.sparse_mla, scale=576**-0.5, d_v=512, impl="pallas")
  f = jax.jit(functools.partial(op, config=ops.GpuConfig(**kw)))
  t0 = time.time()
  o = f(q, kv, idx)[0]
  o.block_until_ready()
  res = {"compile_and_first_s": time.time() - t0}
  t = bench_common.time_fn(f, q, kv, idx, iters=10)
  flops = bench_sparse_mla._fwd_flops(shp)
  res.update(time_ms=t, tflops=flops / (t * 1e-3) / 1e12)
  ref = jax.jit(functools.partial(ops.sparse_mla, scale=576**-0.5, d_v=512, impl="reference"))
  res["rel_err"] = bench_common.rel_err(o, ref(q, kv, idx)[0])
  print("RESULT " + json.dumps(res), flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="experiments/results/sweep_ws.json")
  ap.add_argument("--case", default=None, help="run one case in this process (internal)")
  ap.add_argument("--only", default=None, help="comma-separated case names")
  ap.add_argument("--timeout_s", type=float, default=90.0)
  a = ap.parse_args()
  if a.case:
    return _one(a.case)
  from experiments import bench_common  # noqa: PLC0415
  from pallas_kernels.sparse_mla import ops  # noqa: PLC0415

  names = a.only.split(",") if a.only else list(CASES)
  rows = {}
  for name in names:
    cmd = [sys.executable, "-m", "experiments.sweep_ws", f"--case={name}"]
    try:
      p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout_s)
      lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
      if lines:
        rows[name] = json.loads(lines[-1][7:])
      else:
        rows[name] = {"error": (p.stderr or p.stdout)[-600:]}
    except subprocess.TimeoutExpired:
      rows[name] = {"error": f"timed out after {a.timeout_s} s (deadlock or slow compile)"}
    topk, kw = CASES[name]
    rows[name].update(topk=topk, config=dataclasses.asdict(ops.GpuConfig(**kw)))
    print(name, rows[name], flush=True)
  base = rows.get("direct", {}).get("time_ms")
  for r in rows.values():
    if base and "time_ms" in r and r["topk"] == 2048:
      r["speedup_vs_direct"] = base / r["time_ms"]
  import datetime  # noqa: PLC0415

  import jax  # noqa: PLC0415

  meta = dict(
    date=datetime.date.today().isoformat(),
    device=jax.devices()[0].device_kind,
    jax=jax.__version__,
    commit=bench_common.commit(),
    command="python -m experiments.sweep_ws " + " ".join(sys.argv[1:]),
    shape=S1,
  )
  with open(a.out, "w") as f:
    json.dump({"meta": meta, "cases": rows}, f, indent=1)


if __name__ == "__main__":
  main()
