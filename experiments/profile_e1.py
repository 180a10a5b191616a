# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Where one E1 DSA layer's time goes, kernel by kernel (profiler trace; GPU).

  python -m experiments.profile_e1 --seq_len=16384 --out=PATH.json
  python -m experiments.profile_e1 --small --out=/tmp/p.json   # tiny shapes, CPU (host ops)

For the whole layer fwd+bwd and each of its parts (experiments/bench_indexer.e1_part_fns) it
writes the device time a call and the kernels that take it (bench_common.device_op_times), plus
the sparse KL fwd+bwd with f32 indexer inputs (`sparse_kl_fwd_bwd_f32`, what E1 rows measured
before 2026-12-06). --parts=a,b profiles only those (names as in the output; "layer" is the whole).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from experiments import bench_common as bc
from experiments import bench_indexer as bi


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--seq_len", type=int, default=16384)
  ap.add_argument("--small", action="store_true", help="tiny shapes in CPU interpret mode")
  ap.add_argument("--parts", default="", help="comma-separated part names (all if empty)")
  ap.add_argument("--iters", type=int, default=3)
  a = ap.parse_args()
  t0 = time.perf_counter()
  small = a.small
  l = 256 if small else a.seq_len
  topk, dv, scale = (64 if small else 2048), 512, 0.1352
  interp = small and jax.default_backend() == "cpu"
  impl = bi._mla_impl(small)
  q, kv, qi, ki, wi, do = bi.e1_inputs(l, small)
  bt = min(l, 4096)
  fns = bi.e1_part_fns(q, kv, qi, ki, wi, do, topk, scale, dv, impl, interp, bt)
  f_kl, (_, _, _, idx, p) = fns["sparse_kl_fwd_bwd"]
  fns["sparse_kl_fwd_bwd_f32"] = (
    f_kl,
    (qi.astype(jnp.float32), ki.astype(jnp.float32), wi, idx, p),
  )

  layer = bi.e1_layer_grad(topk, scale, dv, impl, interp, bt)
  fns = {"layer": (layer, (q, kv, qi, ki, wi, do)), **fns}
  only = set(filter(None, a.parts.split(",")))
  rows = {}
  for name, (f, args) in fns.items():
    if only and name not in only:
      continue
    rows[name] = {"wall_ms": bc.time_fn(f, *args, warmup=1, iters=a.iters)}
    rows[name].update(bc.device_op_times(f, *args, iters=a.iters))
    top = ", ".join(f"{o['name'][:40]} {o['ms']:.1f}" for o in rows[name]["ops"][:6])
    print(
      f"{name}: wall {rows[name]['wall_ms']:.1f} ms, device {rows[name]['device_ms']:.1f}: {top}"
    )
  meta = {
    "date": time.strftime("%Y-%m-%d"),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "commit": bc.commit(),
    "command": bc.command("experiments.profile_e1"),
    "shape": {"seq_len": l, "h": q.shape[2], "topk": topk, "H_I": 64, "d_I": 128},
    "sparse_mla_impl": impl,
    "total_s": time.perf_counter() - t0,
  }
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as f:
    json.dump({"meta": meta, "parts": rows}, f, indent=1)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
