# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sweep of the sorted segment sum (kernel_segment_sum_triton.segment_sum_rows: positions per
step block_r, whole masked rows or block_c-column pieces, warps, stages) at one scan step of
E1's 16K backward.

  python -m experiments.sweep_segment_sum --out=PATH.json   # GPU, < 1 min
  python -m experiments.sweep_segment_sum --small --out=/tmp/s.json   # tiny shapes, CPU interpret

The shape is what ops._bwd_kernel_blocked hands it per scan step at L = 16K: 512 tokens x 2048
slots = 1M dK rows of 576 bf16 columns, summed into 16K f32 rows; the ids are uniform over the
rows (~64 positions a row). The sort (kernel_segment_sum_triton.sort_segments) runs once,
outside the timing. "default" is the module's default (4 positions a step, whole rows);
"pieces_r32" the previous default (32 positions, 64-column pieces). "xla" is
jax.ops.segment_sum of the same rows (a scatter-add) for scale. Rel errs are vs the default;
--only=a,b re-runs chosen cases (plus the default). DSA_BENCH_SEG_COLS=128 sweeps the sparse
indexer KL's dk rows (128 columns) instead.
"""

import os
import time

import jax
import jax.numpy as jnp

from experiments import bench_common
from pallas_kernels.sparse_mla import kernel_segment_sum_triton as seg

_E1 = dict(positions=512 * 2048, rows=16384, cols=576)
_SMALL = dict(positions=256, rows=40, cols=128)

CASES = [("default", {})] + [
  (name, kw)
  for name, kw in (
    ("br2", dict(block_r=2)),
    ("br8", dict(block_r=8)),
    ("w2", dict(num_warps=2)),
    ("w8", dict(num_warps=8)),
    ("s1", dict(num_stages=1)),
    ("s3", dict(num_stages=3)),
    ("c64", dict(block_c=64)),  # 64-column pieces, 4 positions: the sparse KL's dk
    ("pieces_r32", dict(block_c=64, block_r=32)),  # the previous default
    ("pieces_r64", dict(block_c=64, block_r=64)),
  )
]


def main():
  a, run = bench_common.sweep_args(budget_s=120.0)
  t_start, interp, only = run["t_start"], run["interpret"], run["only"]
  shp = dict(_SMALL if a.small else _E1)
  # DSA_BENCH_SEG_COLS=128: the sparse KL's dk rows (the indexer's head dim) instead of MLA's 576
  shp["cols"] = int(os.environ.get("DSA_BENCH_SEG_COLS", shp["cols"]))
  k1, k2 = jax.random.split(jax.random.key(0))
  drows = jax.random.normal(k1, (shp["positions"], shp["cols"]), jnp.bfloat16)
  ids = jax.random.randint(k2, (shp["positions"],), 0, shp["rows"], jnp.int32)
  order, starts = jax.block_until_ready(
    jax.jit(seg.sort_segments, static_argnums=1)(ids, shp["rows"])
  )
  init = jnp.zeros((shp["rows"], shp["cols"]), jnp.float32)
  gbytes = (drows.size * 2 + 2 * init.size * 4) / 1e9  # rows read once, dkv read and written

  jobs = []
  for name, kw in CASES:
    if not only or name in only or name == "default":
      fn = jax.jit(
        lambda r, o, s, i, kw=kw: seg.segment_sum_rows(r, o, s, i, interpret=interp, **kw)
      )
      jobs.append((name, kw, fn, (drows, order, starts, init)))
  xla = jax.jit(lambda r, i: i + jax.ops.segment_sum(r.astype(jnp.float32), ids, i.shape[0]))
  jobs.append(("xla", {}, xla, (drows, init)))

  ref, rows = None, []
  meta = {"shape": shp, "gbytes": gbytes, "ids": "uniform over the rows"}
  for name, kw, fn, args in jobs:
    row = {"name": name, "params": kw}
    if name != "default" and time.perf_counter() - t_start > a.budget_s:
      rows.append(row | {"error": "skipped: time budget"})
      continue
    try:
      got = jax.block_until_ready(fn(*args))
      t = bench_common.time_fn(fn, *args, iters=2 if a.small else 10)
      row.update(time_ms=t, tb_per_s=gbytes / (t * 1e-3) / 1e3)
      if name == "default":
        ref, t_ref = got, t
      if ref is not None:
        row.update(rel_err=bench_common.rel_err(got, ref), speedup_vs_default=t_ref / t)
    except Exception as e:  # noqa: BLE001 - a failing case is a finding, keep going
      row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    rows.append(row)
    print(name, {k: v for k, v in row.items() if k != "params"}, flush=True)
    bench_common.write_sweep("sweep_segment_sum", a, t_start, meta, {"cases": rows})


if __name__ == "__main__":
  main()
