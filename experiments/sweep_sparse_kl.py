# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sweep of the sparse-KL Pallas-Triton kernels' block sizes (kernel_sparse_kl_triton.BlockSizes:
chunk width, warps and stages of each pass).

  python -m experiments.sweep_sparse_kl --out=PATH.json   # GPU, one V3.2 layer at 16K, < 2 min
  python -m experiments.sweep_sparse_kl --small --out=/tmp/s.json   # tiny shapes, CPU interpret

Each case times the KL's forward + backward (jax.value_and_grad of Σ dl·kl in q, k, w) at E1's
16K shape: J = 64 indexer heads of D = 128, k = 2048 causal slots per token (ids uniform over the
token's prefix, so early tokens repeat ids and pad with -1, as the top-k does), a positive target
over the valid slots. Rel errs are vs the default case; --only=a,b re-runs chosen cases (plus the
default); cases after --budget_s seconds are skipped.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from experiments import bench_common
from pallas_kernels.lightning_indexer import kernel_sparse_kl_triton as kl_kernels

_E1 = dict(t=16384, j=64, d=128, topk=2048)
_SMALL = dict(t=96, j=8, d=32, topk=32)

BASE = kl_kernels.BlockSizes()
CASES = [("default", BASE)] + [
  (name, dataclasses.replace(BASE, **kw))
  for name, kw in (
    ("bk32", dict(block_k=32)),
    ("bk128", dict(block_k=128)),
    ("fwd_w8", dict(num_warps=8)),
    ("fwd_s3", dict(num_stages=3)),
    ("bwd_w8", dict(num_warps_bwd=8)),
    ("bwd_s1", dict(num_stages_bwd=1)),
    ("bwd_s3", dict(num_stages_bwd=3)),
  )
]


def inputs(shp, seed=0):
  """q [1,T,J,D], k [1,T,D], w [1,T,J] bf16; causal ids [1,T,k] (-1 past the prefix); p > 0 at
  the valid slots (normalised per token); dl [1,T]."""
  t, j, d, kk = shp["t"], shp["j"], shp["d"], shp["topk"]
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (1, t, j, d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, t, d), jnp.bfloat16)
  w = (jax.random.normal(ks[2], (1, t, j), jnp.float32) * j**-0.5).astype(jnp.bfloat16)
  pos = jnp.arange(t, dtype=jnp.int32)[None, :, None]
  u = jax.random.uniform(ks[3], (1, t, kk))
  ids = jnp.minimum((u * (pos + 1)).astype(jnp.int32), pos)
  ids = jnp.where(jnp.arange(kk)[None, None] <= pos, ids, -1)
  p = jnp.where(ids >= 0, jax.random.uniform(ks[4], (1, t, kk), minval=0.01), 0.0)
  p = p / jnp.sum(p, -1, keepdims=True)
  dl = jax.random.uniform(ks[5], (1, t), jnp.float32)
  return q, k, w, ids, p, dl


def main():
  a, run = bench_common.sweep_args(budget_s=150.0)
  t_start, interp, only = run["t_start"], run["interpret"], run["only"]
  shp = _SMALL if a.small else _E1
  iters = 2 if a.small else 5
  q, k, w, ids, p, dl = inputs(shp)

  def step(bs, q, k, w):
    kl = kl_kernels.sparse_kl(q, k, w, ids, p, bs, interp)
    return jnp.sum(kl * dl), kl

  ref, rows = None, []
  for name, bs in CASES:
    if only and name not in only and name != "default":
      continue
    row = {"name": name, "block_sizes": dataclasses.asdict(bs)}
    if name != "default" and time.perf_counter() - t_start > a.budget_s:
      rows.append(row | {"error": "skipped: time budget"})
      continue
    try:
      fn = jax.jit(jax.value_and_grad(functools.partial(step, bs), (0, 1, 2), has_aux=True))
      (_, kl), grads = got = jax.block_until_ready(fn(q, k, w))
      row["time_ms"] = bench_common.time_fn(fn, q, k, w, iters=iters)
      if name == "default":
        ref = (kl, grads)
      if ref is not None:
        row["rel_err_kl"] = bench_common.rel_err(kl, ref[0])
        for tag, x, y in zip(("dq", "dk", "dw"), grads, ref[1]):
          row[f"rel_err_{tag}"] = bench_common.rel_err(x, y)
        row["speedup_vs_default"] = rows[0]["time_ms"] / row["time_ms"] if rows else 1.0
      del got
    except Exception as e:  # noqa: BLE001 - a failing case is a finding, keep going
      row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    rows.append(row)
    print(name, {k_: v for k_, v in row.items() if k_ != "block_sizes"}, flush=True)
    # after every case: a run cut short keeps what it measured
    bench_common.write_sweep("sweep_sparse_kl", a, t_start, {"shape": shp}, {"fwd_bwd": rows})


if __name__ == "__main__":
  main()
