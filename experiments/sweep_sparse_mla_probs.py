# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Head-mean sparse-attention probabilities on one GPU: the Pallas-Triton kernel
(kernel_triton.BlockSizes variants) and the Mosaic GPU kernel (variant "mosaic",
kernel_mosaic_gpu_probs.py; timed through the op only) against the reference, at the S3 shape.

  python -m experiments.sweep_sparse_mla_probs --out=experiments/results/sweep_sparse_mla_probs.json
  python -m experiments.sweep_sparse_mla_probs --small --out=/tmp/s.json  # CPU, interpret

S3 shape: 4096 queries, 32768 rows, 128 heads, 576 = 512 + 64, top-2048 uniform random ids, bf16,
the lse of the f32 reference. Each variant: median time of the kernel in its own layout (the
split and padding of q and kv are not timed), the op end to end, and the max abs error against
the reference on the f32 inputs. The reference (XLA, gathers the rows again) is the baseline,
timed in the same process. The file is rewritten after every row.
"""

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp

from experiments import bench_common as bc
from pallas_kernels.sparse_mla import kernel_triton, ops, reference

BS = kernel_triton.BlockSizes
SCALE = 0.1352
VARIANTS = {
  "default": BS(),
  "h32_k32": BS(block_k=32),
  "h64_k32": BS(block_h=64, block_k=32),
  "h32_k64_w4": BS(num_warps=4),
  "h32_k64_s3": BS(num_stages=3),
  "h16_k64": BS(block_h=16),
  "h32_k128": BS(block_k=128),
  "mosaic": None,
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="experiments/results/sweep_sparse_mla_probs.json")
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--budget_s", type=float, default=200.0)
  ap.add_argument("--variants", default="")
  args = ap.parse_args()
  t_q, s, h, k = (8, 96, 32, 64) if args.small else (4096, 32768, 128, 2048)
  k_dim, d_v = (96, 64) if args.small else (576, 512)
  interp = args.small
  iters = 1 if args.small else 10
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (1, t_q, h, k_dim), jnp.bfloat16)
  kv = jax.random.normal(keys[1], (1, s, k_dim), jnp.bfloat16)
  idx = jax.random.randint(keys[2], (1, t_q, k), 0, s, jnp.int32)
  shape = dict(s_q=t_q, s_kv=s, h=h, d_qk=k_dim, topk=k)
  cmd = "python -m experiments.sweep_sparse_mla_probs " + " ".join(sys.argv[1:])
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
  rows, t_start = [], time.time()

  def dump():
    with open(args.out, "w") as f:
      json.dump({"results": rows}, f, indent=1)

  names = [n for n in args.variants.split(",") if n] or list(VARIANTS)
  for name in names[:2] if args.small else names:
    bsz = VARIANTS[name]
    extra = dict(variant=name, command=cmd)
    if bsz is not None:
      extra["block_sizes"] = dataclasses.asdict(bsz)
    if time.time() - t_start > args.budget_s:
      rows.append(bc.row("PROBS", shape, float("nan"), None, skipped="budget", **extra))
      continue
    if bsz is None:  # the Mosaic GPU kernel, through the op (its layout is the forward's)
      try:
        ops.GPU_PROBS_MOSAIC = True
        op = jax.jit(
          lambda q, kv, idx, lse: ops.sparse_mla_probs(
            q, kv, idx, lse, scale=SCALE, impl="pallas", interpret=interp
          )
        )
        t0 = time.time()
        p = jax.block_until_ready(op(q, kv, idx, lse))
        compile_s = time.time() - t0
        t = bc.time_fn(op, q, kv, idx, lse, warmup=1, iters=iters)
        err = float(jnp.max(jnp.abs(p - want)))
        rows.append(
          bc.row(
            "PROBS",
            shape,
            t,
            None,
            op_ms=t,
            compile_s=compile_s,
            max_abs_err=err,
            baseline=base,
            **extra,
          )  # fmt: skip
        )
      except Exception as e:  # noqa: BLE001 - record the failure, go on
        rows.append(
          bc.row(
            "PROBS", shape, float("nan"), None, error=f"{type(e).__name__}: {e}"[:400], **extra
          )
        )
      finally:
        ops.GPU_PROBS_MOSAIC = False
      print(json.dumps(rows[-1]), flush=True)
      dump()
      continue
    try:
      hp = ops._round_up(h, bsz.block_h)
      lay = jax.jit(
        lambda q, kv, idx, lse, bsz=bsz, hp=hp: (
          ops._triton_layout(q, kv, idx, bsz)[:5] + (ops._pad_heads(lse, hp, jnp.inf),)
        )
      )
      qn, qr, kvn, kvr, gidx, lse_p = lay(q, kv, idx, lse)
      kern = jax.jit(
        lambda qn, qr, lse_p, kvn, kvr, gidx, bsz=bsz: kernel_triton.sparse_mla_probs(
          qn, qr, lse_p, kvn, kvr, gidx, scale=SCALE, h=h, block_sizes=bsz, interpret=interp
        )
      )
      pargs = (qn, qr, lse_p, kvn, kvr, gidx)
      t0 = time.time()
      p = jax.block_until_ready(kern(*pargs))[:, :k].reshape(1, t_q, k)
      compile_s = time.time() - t0
      t = bc.time_fn(kern, *pargs, warmup=1, iters=iters)
      ops.PROBS_BLOCK_SIZES = bsz
      op = jax.jit(
        lambda q, kv, idx, lse: ops.sparse_mla_probs(
          q, kv, idx, lse, scale=SCALE, impl="pallas", interpret=interp
        )
      )
      t_op = bc.time_fn(op, q, kv, idx, lse, warmup=1, iters=iters)
      rows.append(
        bc.row(
          "PROBS",
          shape,
          t,
          None,
          op_ms=t_op,
          compile_s=compile_s,
          max_abs_err=float(jnp.max(jnp.abs(p - want))),
          baseline=base,
          **extra,
        )
      )
    except Exception as e:  # noqa: BLE001 - record the failure, go on with the next variant
      rows.append(
        bc.row("PROBS", shape, float("nan"), None, error=f"{type(e).__name__}: {e}"[:400], **extra)
      )
    print(json.dumps(rows[-1]), flush=True)
    dump()
  dump()


if __name__ == "__main__":
  main()
