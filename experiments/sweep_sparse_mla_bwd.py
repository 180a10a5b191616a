# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sparse-MLA backward and head-mean probabilities on one GPU: the Pallas-Triton kernels
(kernel_triton.BlockSizes variants) against the blocked XLA backward and the reference
probabilities, at the S3 shape.

  python -m experiments.sweep_sparse_mla_bwd --out=experiments/results/sweep_sparse_mla_bwd.json
  python -m experiments.sweep_sparse_mla_bwd --small --out=/tmp/s.json  # CPU, interpret

S3 shape: 4096 queries, 32768 rows, 128 heads, 576 = 512 + 64, top-2048 uniform random ids, bf16.
Backward rows time dq + dkv from saved (out, lse) with both cotangents (dlse nonzero); TFLOP/s by
the S3 convention 2·T·H·k·(3·576 + 2·512) (the kernels recompute P and dP once more: 7 GEMMs where
that count has 5). Errors: relative to autodiff of the f32 reference. Probability rows: time and
max abs error against the reference on the f32 lse. The file is rewritten after every row.
"""

import argparse
import dataclasses
import functools
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
  "h64_k64": BS(block_k=64),
  "h64_k16": BS(block_k=16),
  "h32_k32": BS(block_h=32),
  "h64_k32_w4": BS(num_warps=4),
  "h64_k32_s3": BS(num_stages=3),
  "h128_k32": BS(block_h=128),
  "h32_k64": BS(block_h=32, block_k=64),
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="experiments/results/sweep_sparse_mla_bwd.json")
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--budget_s", type=float, default=300.0)
  ap.add_argument("--variants", default="")
  args = ap.parse_args()
  t_q, s, h, k = (8, 96, 32, 64) if args.small else (4096, 32768, 128, 2048)
  k_dim, d_v = (96, 64) if args.small else (576, 512)
  interp = args.small
  iters = 1 if args.small else 5
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (1, t_q, h, k_dim), jnp.bfloat16)
  kv = jax.random.normal(keys[1], (1, s, k_dim), jnp.bfloat16)
  idx = jax.random.randint(keys[2], (1, t_q, k), 0, s, jnp.int32)
  do = jax.random.normal(keys[3], (1, t_q, h, d_v), jnp.bfloat16)
  dl = jax.random.normal(keys[4], (1, t_q, h), jnp.float32) * 0.1
  shape = dict(s_q=t_q, s_kv=s, h=h, d_qk=k_dim, d_v=d_v, topk=k)
  flops = 2 * t_q * h * k * (3 * k_dim + 2 * d_v)
  cmd = "python -m experiments.sweep_sparse_mla_bwd " + " ".join(sys.argv[1:])
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    fn = lambda q, kv: reference.sparse_mla_reference(q, kv, idx, scale=SCALE, d_v=d_v)
    (out, lse), vjp = jax.vjp(fn, f32(q), f32(kv))
    rq, rkv = jax.jit(lambda vjp, c: vjp(c))(vjp, (f32(do), dl))
    want_p = jax.jit(
      lambda q, kv, lse: reference.sparse_mla_probs_reference(q, kv, idx, lse, scale=SCALE)
    )(f32(q), f32(kv), lse)
  out = out.astype(jnp.bfloat16)
  rows, t_start = [], time.time()

  def dump():
    with open(args.out, "w") as f:
      json.dump({"results": rows}, f, indent=1)

  def err(g):
    return {"dq": bc.rel_err(g[0], rq), "dkv": bc.rel_err(g[1], rkv)}

  xla = jax.jit(
    lambda q, kv, idx, out, lse, do, dl: ops._bwd_blocked(
      q, kv, idx, out, lse, do, dl, scale=SCALE, d_v=d_v, block_t=256, update_dtype=jnp.bfloat16
    )
  )
  bargs = (q, kv, idx, out, lse, do, dl)
  t_xla = bc.time_fn(xla, *bargs, warmup=1, iters=iters)
  e_xla = err(xla(*bargs))
  probs_ref = jax.jit(
    lambda q, kv, idx, lse: reference.sparse_mla_probs_reference(q, kv, idx, lse, scale=SCALE)
  )
  t_pref = bc.time_fn(probs_ref, q, kv, idx, lse, warmup=1, iters=iters)
  base = {"name": "blocked XLA backward (256-token scan steps)", "time_ms": t_xla, "rel_err": e_xla}
  rows.append(bc.row("S3_XLA", shape, t_xla, flops, rel_err=e_xla, command=cmd))
  print(json.dumps(rows[-1]), flush=True)
  names = [n for n in args.variants.split(",") if n] or list(VARIANTS)
  for name in names[:2] if args.small else names:
    bsz = VARIANTS[name]
    extra = dict(variant=name, block_sizes=dataclasses.asdict(bsz), command=cmd)
    if time.time() - t_start > args.budget_s:
      rows.append(bc.row("S3_TRITON", shape, float("nan"), None, skipped="budget", **extra))
      continue
    try:
      tri = jax.jit(
        functools.partial(ops._bwd_triton, scale=SCALE, d_v=d_v, bsz=bsz, interpret=interp)
      )
      t0 = time.time()
      g = jax.block_until_ready(tri(*bargs))
      compile_s = time.time() - t0
      t = bc.time_fn(tri, *bargs, warmup=1, iters=iters)
      lay = jax.jit(
        lambda q, kv, idx, lse, bsz=bsz: (
          ops._triton_layout(q, kv, idx, d_v, bsz)[:5]
          + (ops._pad_heads(lse, ops._round_up(h, bsz.block_h), jnp.inf),)
        )
      )
      qn, qr, kvn, kvr, gidx, lse_p = lay(q, kv, idx, lse)
      pk = jax.jit(
        lambda qn, qr, lse_p, kvn, kvr, gidx, bsz=bsz: kernel_triton.sparse_mla_probs(
          qn, qr, lse_p, kvn, kvr, gidx, scale=SCALE, h=h, block_sizes=bsz, interpret=interp
        )
      )
      pargs = (qn, qr, lse_p, kvn, kvr, gidx)
      p = pk(*pargs)[:, :k].reshape(1, t_q, k)
      t_p = bc.time_fn(pk, *pargs, warmup=1, iters=iters)
      rows.append(
        bc.row(
          "S3_TRITON",
          shape,
          t,
          flops,
          rel_err=err(g),
          compile_s=compile_s,
          baseline=base,
          probs_ms=t_p,
          probs_reference_ms=t_pref,
          probs_max_abs_err=float(jnp.max(jnp.abs(p - want_p))),
          flops_convention="2*s_q*h*topk*(3*d_qk+2*d_v), backward only",
          **extra,
        )
      )
    except Exception as e:  # noqa: BLE001 - record the failure, go on with the next variant
      rows.append(
        bc.row(
          "S3_TRITON", shape, float("nan"), None, error=f"{type(e).__name__}: {e}"[:400], **extra
        )
      )
    print(json.dumps(rows[-1]), flush=True)
    dump()
  dump()


if __name__ == "__main__":
  main()
