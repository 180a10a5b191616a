# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sparse MLA fwd+bwd, kernel by kernel, under different slot-id patterns at E1's 16K layer.

  python -m experiments.sweep_sparse_mla_ids --out=PATH.json   # GPU, ~1 min
  python -m experiments.sweep_sparse_mla_ids --small --out=/tmp/s.json   # tiny shapes, CPU

The kernels gather one row per slot, so their speed depends on which rows the ids name, not
only on how many. Cases (query t, top-k k, S rows):
  uniform             ids uniform over all S rows (what S1-S3 time)
  causal              ids uniform over [0, t]; for t < k, slots 0..t are rows 0..t and the
                      rest invalid (-1), as a causal top-k hands them over (E1)
  causal_no_invalid   causal, with the invalid slots replaced by valid rows (slot mod (t + 1))
  early_causal        causal for t < k only, uniform after: the invalid slots' share alone
  hot_row             uniform, but every query also selects row 0 in its first slot (an
                      attention sink that every query picks): one row of the segment sum
                      gets T positions
Per case: the jitted fwd+bwd's wall time and its top kernels' device time
(bench_common.device_op_times). --only=a,b runs chosen cases.
"""

import time

import jax
import jax.numpy as jnp

from experiments import bench_common
from pallas_kernels.sparse_mla import ops as mla

_E1 = dict(t=16384, s=16384, h=128, d_qk=576, d_v=512, k=2048)
_SMALL = dict(t=8, s=80, h=4, d_qk=64, d_v=32, k=64)
CASES = ("uniform", "causal", "causal_no_invalid", "early_causal", "hot_row")


def slot_ids(case: str, t: int, s: int, k: int, key) -> jax.Array:
  """[1, t, k] int32 slot ids of one case (module docstring)."""
  pos = jnp.arange(t)[:, None]
  slot = jnp.arange(k)[None]
  uniform = jax.random.randint(key, (t, k), 0, s, jnp.int32)
  drawn = (jax.random.uniform(key, (t, k)) * (pos + 1)).astype(jnp.int32)  # in [0, t]
  prefix = pos < k
  causal = jnp.where(prefix, jnp.where(slot <= pos, slot, -1), drawn)
  ids = {
    "uniform": uniform,
    "causal": causal,
    "causal_no_invalid": jnp.where(prefix, slot % (pos + 1), drawn),
    "early_causal": jnp.where(prefix, causal, uniform),
    "hot_row": uniform.at[:, 0].set(0),
  }[case]
  return ids[None].astype(jnp.int32)


def main():
  a, run = bench_common.sweep_args(budget_s=150.0)
  t_start, interp, only = run["t_start"], run["interpret"], run["only"]
  shp = _SMALL if a.small else _E1
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(k1, (1, shp["t"], shp["h"], shp["d_qk"]), jnp.bfloat16)
  kv = jax.random.normal(k2, (1, shp["s"], shp["d_qk"]), jnp.bfloat16)
  do = jax.random.normal(k4, (1, shp["t"], shp["h"], shp["d_v"]), jnp.bfloat16)
  scale = shp["d_qk"] ** -0.5
  impl = "pallas" if interp or jax.default_backend() == "gpu" else "reference"

  def loss(q, kv, idx, do):
    o = mla.sparse_mla(q, kv, idx, scale=scale, d_v=shp["d_v"], impl=impl, interpret=interp)[0]
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, (0, 1)))
  rows = []
  meta = {"shape": shp, "impl": impl}
  for case in CASES:
    if only and case not in only:
      continue
    row = {"name": case}
    if time.perf_counter() - t_start > a.budget_s:
      rows.append(row | {"error": "skipped: time budget"})
      continue
    idx = slot_ids(case, shp["t"], shp["s"], shp["k"], k3)
    iters = 1 if a.small else 3
    row["time_ms"] = bench_common.time_fn(grad, q, kv, idx, do, warmup=1, iters=iters)
    ops = bench_common.device_op_times(grad, q, kv, idx, do, iters=iters, top=6)
    row["device_ms"] = ops["device_ms"]
    row["kernels_ms"] = {o["name"][:48]: o["ms"] for o in ops["ops"]}
    rows.append(row)
    print(case, f"{row['time_ms']:.1f} ms:", row["kernels_ms"], flush=True)
    bench_common.write_sweep("sweep_sparse_mla_ids", a, t_start, meta, {"cases": rows})


if __name__ == "__main__":
  main()
