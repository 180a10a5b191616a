# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Head-mean sparse-attention probabilities on one GPU: the Mosaic GPU kernel
(kernel_mosaic_gpu_probs.py, through ops.sparse_mla_probs) against the reference, at the S3 shape.

  python -m experiments.sweep_sparse_mla_probs --out=experiments/results/sweep_sparse_mla_probs.json
  python -m experiments.sweep_sparse_mla_probs --small --out=/tmp/s.json  # CPU, interpret

S3 shape: 4096 queries, 32768 rows, 128 heads, 576 = 512 + 64, top-2048 uniform random ids, bf16,
the lse of the f32 reference. The row: median time of the op, compile seconds, and the max abs
error against the reference on the f32 inputs. The reference (XLA, gathers the rows again) is the
baseline, timed in the same process.
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from experiments import bench_common as bc
from pallas_kernels.sparse_mla import ops, reference

SCALE = 0.1352


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="experiments/results/sweep_sparse_mla_probs.json")
  ap.add_argument("--small", action="store_true")
  args = ap.parse_args()
  t_q, s, h, k = (8, 96, 32, 64) if args.small else (4096, 32768, 128, 2048)
  k_dim, d_v = (96, 64) if args.small else (576, 512)
  iters = 1 if args.small else 10
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (1, t_q, h, k_dim), jnp.bfloat16)
  kv = jax.random.normal(keys[1], (1, s, k_dim), jnp.bfloat16)
  idx = jax.random.randint(keys[2], (1, t_q, k), 0, s, jnp.int32)
  shape = dict(s_q=t_q, s_kv=s, h=h, d_qk=k_dim, topk=k)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    lse = reference.sparse_mla_reference(f32(q), f32(kv), idx, scale=SCALE, d_v=d_v)[1]
    want = jax.jit(
      lambda q, kv, lse: reference.sparse_mla_probs_reference(q, kv, idx, lse, scale=SCALE)
    )(f32(q), f32(kv), lse)
  ref = jax.jit(
    lambda q, kv, idx, lse: reference.sparse_mla_probs_reference(q, kv, idx, lse, scale=SCALE)
  )
  t_ref = bc.time_fn(ref, q, kv, idx, lse, warmup=1, iters=iters)
  base = {"name": "reference probabilities (XLA gather + einsum)", "time_ms": t_ref}
  op = jax.jit(
    lambda q, kv, idx, lse: ops.sparse_mla_probs(
      q, kv, idx, lse, scale=SCALE, impl="pallas", interpret=args.small
    )
  )
  t0 = time.time()
  p = jax.block_until_ready(op(q, kv, idx, lse))
  compile_s = time.time() - t0
  t = bc.time_fn(op, q, kv, idx, lse, warmup=1, iters=iters)
  row = bc.row(
    "PROBS",
    shape,
    t,
    None,
    variant="mosaic",
    compile_s=compile_s,
    max_abs_err=float(jnp.max(jnp.abs(p - want))),
    baseline=base,
    command="python -m experiments.sweep_sparse_mla_probs " + " ".join(sys.argv[1:]),
  )
  print(json.dumps(row), flush=True)
  with open(args.out, "w") as f:
    json.dump({"results": [row]}, f, indent=1)


if __name__ == "__main__":
  main()
