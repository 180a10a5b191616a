# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sweep of the warp-specialised Mosaic GPU sparse-MLA forward (kernel.WsBlockSizes) at S1 shapes.

  python -m experiments.sweep_ws --out=experiments/results/sweep_ws.json   # H200, ~3 min

Each case runs in its own subprocess with a time limit, so a case that deadlocks (a warpgroup
waiting on a barrier or on registers that never come) is recorded as such and the sweep goes on.
Case names as of the direct copies (commit da54a40): ws_lane_copy1 was "ws_default" before.
The Triton forward (the default before mosaic_ws) is timed in the same run as the baseline (ratio = its time / case's).
rel_err is vs the XLA gather reference on the same inputs.
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import time

CASES = {
  "triton_default": None,  # ops.TRITON_DEFAULT_VARIANT's Triton forward
  # Pallas copy_gmem_to_smem row copies (one thread issues them one after the other):
  "ws_copy2": {"direct": False, "copy_wgs": 2, "lane_copies": False},
  "ws_copy1_tensormap": {
    "direct": False,
    "copy_wgs": 1,
    "bulk_copies": False,
    "lane_copies": False,
  },
  "ws_copy2_tensormap": {
    "direct": False,
    "copy_wgs": 2,
    "bulk_copies": False,
    "lane_copies": False,
  },
  "ws_copy1": {"direct": False, "copy_wgs": 1, "lane_copies": False},
  "ws_copy4": {"direct": False, "copy_wgs": 4, "lane_copies": False},
  "ws_copy2_noab": {"direct": False, "copy_wgs": 2, "no_auto_barriers": True, "lane_copies": False},
  "ws_copy2_probe_no_math": {
    "direct": False,
    "copy_wgs": 2,
    "probe_no_math": True,
    "lane_copies": False,
  },
  "ws_copy4_probe_no_math": {
    "direct": False,
    "copy_wgs": 4,
    "probe_no_math": True,
    "lane_copies": False,
  },
  # lane copies (one row per thread, inline Mosaic GPU):
  "ws_lane_copy2": {"direct": False, "copy_wgs": 2},
  "ws_lane_copy1": {"direct": False},  # lane copies, 1 copy WG (the default before direct)
  "ws_lane_copy2_noab": {"direct": False, "copy_wgs": 2, "no_auto_barriers": True},
  "ws_lane_copy2_probe_no_math": {"direct": False, "copy_wgs": 2, "probe_no_math": True},
  "ws_lane_copy1_noab": {"direct": False, "no_auto_barriers": True},
  # logits split between the compute WGs (P halves swapped through SMEM), ids from GMEM (lane
  # copies with GMEM ids crashed on the H200, sweep_ws_split*.json, so Pallas copies):
  "ws_split_pallas": {
    "direct": False,
    "split_qk": True,
    "idx_in_smem": False,
    "lane_copies": False,
    "copy_wgs": 2,
  },
  # direct: 16-byte cp.async pieces straight into a double-buffered swizzled operand:
  "ws_direct": {},  # the default
  "ws_direct_noab": {"no_auto_barriers": True},
  "ws_direct_probe_no_math": {"probe_no_math": True},
  # pairs: no duplicated logits (alternate chunks per compute WG, P tiles swapped via SMEM):
  "ws_pairs": {"pairs": True},
  "ws_pairs_noab": {"pairs": True, "no_auto_barriers": True},
}
S1 = dict(s_q=4096, s_kv=32768, h=128, d_qk=576, d_v=512, topk=2048)


def _one(name):
  import functools  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from experiments import bench_common, bench_sparse_mla  # noqa: PLC0415
  from pallas_kernels.sparse_mla import kernel, ops  # noqa: PLC0415

  q, kv, idx = bench_sparse_mla._inputs(S1)
  op = functools.partial(ops.sparse_mla, scale=576**-0.5, d_v=512, impl="pallas")
  kw = CASES[name]
  if kw is None:
    f = jax.jit(functools.partial(op, variant=ops.TRITON_DEFAULT_VARIANT))
  else:
    f = jax.jit(functools.partial(op, variant="mosaic_ws", ws_config=kernel.WsBlockSizes(**kw)))
  t0 = time.time()
  o = f(q, kv, idx)[0]
  o.block_until_ready()
  res = {"compile_and_first_s": time.time() - t0}
  t = bench_common.time_fn(f, q, kv, idx, iters=10)
  flops = bench_sparse_mla._fwd_flops(S1)
  res.update(time_ms=t, tflops=flops / (t * 1e-3) / 1e12)
  if kw is None or not kw.get("probe_no_math"):
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
  from pallas_kernels.sparse_mla import kernel  # noqa: PLC0415

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
    kw = CASES[name]
    if kw is not None:
      rows[name]["config"] = dataclasses.asdict(kernel.WsBlockSizes(**kw))
    print(name, rows[name], flush=True)
  base = rows.get("triton_default", {}).get("time_ms")
  for r in rows.values():
    if base and "time_ms" in r:
      r["speedup_vs_triton_default"] = base / r["time_ms"]
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
