# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sweep of the sparse-MLA GPU backward (ops.GpuConfig: bwd "xla" or "kernel", its scan steps
bwd_block_t) at S1 shapes.

  python -m experiments.sweep_sparse_mla --out=PATH.json   # GPU, S1 shapes, < 2 min
  python -m experiments.sweep_sparse_mla --small --out=/tmp/s.json   # tiny shapes, CPU interpret

Each case runs the op's custom-VJP backward rule (ops._sparse_mla_gpu_bwd) on the residuals of
one default forward, with both cotangents (out and lse): exactly what jax.vjp runs, but one
forward serves every case. The default is also timed through jax.vjp as
experiments/bench_sparse_mla.py does (row "default_via_jax_vjp"), to show the two agree. Rel errs
are vs the default. --only=a,b re-runs chosen cases (plus the default); cases after --budget_s
seconds are skipped.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from experiments import bench_common
from pallas_kernels.sparse_mla import ops

SCALE = 576**-0.5
_S1 = dict(s_q=4096, s_kv=32768, h=128, d_qk=576, d_v=512, topk=2048)
_SMALL = dict(s_q=4, s_kv=96, h=64, d_qk=128, d_v=64, topk=128)

BASE = ops.GpuConfig()
CASES = (
  [("default", BASE), ("xla", dataclasses.replace(BASE, bwd="xla"))]
  + [(f"bt{bt}", dataclasses.replace(BASE, bwd_block_t=bt)) for bt in (256, 1024)]
  + [(f"xla_bt{bt}", dataclasses.replace(BASE, bwd="xla", bwd_block_t=bt)) for bt in (256, 1024)]
)


def _bwd_flops(s):
  return 2 * s["s_q"] * s["h"] * s["topk"] * (3 * s["d_qk"] + 2 * s["d_v"])


def _err(e):
  return f"{type(e).__name__}: {str(e)[:400]}"


def main():
  a, run = bench_common.sweep_args(budget_s=200.0)
  t_start, interp, only = run["t_start"], run["interpret"], run["only"]
  shp = _SMALL if a.small else _S1
  d_v, iters = shp["d_v"], (2 if a.small else 5)

  k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(k1, (1, shp["s_q"], shp["h"], shp["d_qk"]), jnp.bfloat16)
  kv = jax.random.normal(k2, (1, shp["s_kv"], shp["d_qk"]), jnp.bfloat16)
  idx = jax.random.randint(k3, (1, shp["s_q"], shp["topk"]), 0, shp["s_kv"], jnp.int32)
  cts = (
    jax.random.normal(k4, q.shape[:-1] + (d_v,), jnp.bfloat16),
    jax.random.normal(k5, q.shape[:-1], jnp.float32),
  )
  op = functools.partial(ops.sparse_mla, impl="pallas", scale=SCALE, d_v=d_v, interpret=interp)
  # One default forward for every case's residuals (q, kv, idx, out, lse).
  res_fn = jax.jit(lambda q, kv, idx: jax.vjp(lambda q, kv: op(q, kv, idx), q, kv)[0])
  out, lse = jax.block_until_ready(res_fn(q, kv, idx))
  res = (q, kv, idx, out, lse)

  jobs = []
  for name, cfg in CASES:
    if not only or name in only or name == "default":
      rule = lambda res, cts, cfg=cfg: ops._sparse_mla_gpu_bwd(SCALE, d_v, interp, cfg, res, cts)[
        :2
      ]
      jobs.append((name, cfg, jax.jit(rule), (res, cts)))
  vjp = jax.jit(lambda q, kv, idx: jax.vjp(lambda q, kv: op(q, kv, idx), q, kv)[1])(q, kv, idx)
  jobs.append(("default_via_jax_vjp", BASE, jax.jit(lambda f, c: f(c)), (vjp, cts)))

  flops, ref, rows = _bwd_flops(shp), None, []
  meta = {"shape": shp, "flops": "2*s_q*h*topk*(3*d_qk+2*d_v)"}
  for name, cfg, fn, args in jobs:
    row = {"name": name, "config": dataclasses.asdict(cfg)}
    if name != "default" and time.perf_counter() - t_start > a.budget_s:
      row["error"] = "skipped: time budget"
      rows.append(row)
      continue
    try:
      got = jax.block_until_ready(fn(*args))
      t = bench_common.time_fn(fn, *args, iters=iters)
      row.update(time_ms=t, tflops=flops / (t * 1e-3) / 1e12)
      if name == "default":
        ref, t_ref = got, t
      if ref is not None:
        for tag, x, y in zip(("dq", "dkv"), got, ref):
          row[f"rel_err_{tag}"] = bench_common.rel_err(x, y)
        row["speedup_vs_default"] = t_ref / t
      del got
    except Exception as e:  # noqa: BLE001 - a failing case is a finding, keep going
      row["error"] = _err(e)
    rows.append(row)
    print(name, {k: v for k, v in row.items() if k != "config"}, flush=True)
    # after every case: a run cut short keeps what it measured
    bench_common.write_sweep("sweep_sparse_mla", a, t_start, meta, {"backward": rows})


if __name__ == "__main__":
  main()
