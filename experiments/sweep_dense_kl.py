# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Dense-KL (warm-up) kernel sweep on one GPU: kernel_kl_triton.BlockSizes at one layer's shapes.

  python -m experiments.sweep_dense_kl --out=experiments/results/sweep_dense_kl.json
  python -m experiments.sweep_dense_kl --small --out=/tmp/sweep_dense_kl.json  # CPU, interpret

One V3.2 layer's warm-up KL, batch 1, L queries over L keys (default 16384): indexer q [L,64,128]
and k [L,128] bf16, w [L,64] f32, the attention target in the trainer's MHA form (q, k
[L,128,192], --form=mha, the default) or the absorbed form (q [L,128,576] over kv rows [L,576],
--form=absorbed), bf16, no attention lse given (the lse kernel runs, as in the trainer). Each variant: compile time, the
forward alone and value+grad (q, k, w) median times, and the max relative error of the KL and
the gradients against the default block sizes. The streamed XLA custom_vjp (grad.py) is the
baseline, measured in the same process. The file is rewritten after every row.
"""

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from pallas_kernels.lightning_indexer import grad, kernel_kl_triton

BS = kernel_kl_triton.BlockSizes

# name -> BlockSizes; the first is the kernels' default (the numerics reference of the others).
VARIANTS = {
  "default": BS(),
  "s64": BS(block_s=64),
  "s128": BS(block_s=128),
  "s128_fwd3": BS(block_s=128, num_stages=3),
  "s128_bwd3": BS(block_s=128, num_stages_bwd=3),
  "s128_stages3": BS(block_s=128, num_stages=3, num_stages_bwd=3),
  "s128_c128": BS(block_s=128, block_c=128),
  "t128": BS(block_t=128),
  "t128_s128": BS(block_t=128, block_s=128),
  "s32": BS(block_s=32),
}


def _inputs(l, scale_w, form):
  ks = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(ks[0], (1, l, 64, 128), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, l, 128), jnp.bfloat16)
  w = jax.random.normal(ks[2], (1, l, 64), jnp.float32) * scale_w
  if form == "mha":  # the trainer's dense phase: per-head q, k of 192 (= 128 nope + 64 rope)
    aq = jax.random.normal(ks[3], (1, l, 128, 192), jnp.bfloat16)
    akv = jax.random.normal(ks[4], (1, l, 128, 192), jnp.bfloat16)
  else:  # the absorbed MQA form: 576-wide latent rows shared by the heads
    aq = jax.random.normal(ks[3], (1, l, 128, 576), jnp.bfloat16)
    akv = jax.random.normal(ks[4], (1, l, 576), jnp.bfloat16)
  return q, k, w, aq, akv


def _fns(kl_fn):
  fwd = jax.jit(lambda q, k, w, aq, akv: kl_fn(q, k, w, aq, akv))
  vg = jax.jit(
    jax.value_and_grad(lambda q, k, w, aq, akv: jnp.sum(kl_fn(q, k, w, aq, akv)), (0, 1, 2))
  )
  return fwd, vg


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="experiments/results/sweep_dense_kl.json")
  ap.add_argument("--length", type=int, default=16384)
  ap.add_argument("--small", action="store_true", help="tiny shapes in interpret mode (CPU)")
  ap.add_argument("--budget_s", type=float, default=420.0)
  ap.add_argument("--variants", default="", help="comma list of names (default: all)")
  ap.add_argument("--form", default="mha", choices=["mha", "absorbed"], help="target's form")
  args = ap.parse_args()
  l = 128 if args.small else args.length
  interp = args.small
  iters = 1 if args.small else 5
  scale = 576**-0.5
  x = _inputs(l, 1 / np.sqrt(64 * 128), args.form)
  names = [n for n in args.variants.split(",") if n] or list(VARIANTS)
  if args.small:
    names = names[:2]
  rows, ref, t_start = [], None, time.time()

  def dump():
    with open(args.out, "w") as f:
      json.dump({"results": rows}, f, indent=1)

  base_fwd, base_vg = _fns(
    lambda q, k, w, aq, akv: grad.dense_kl(q, k, w, aq, akv, None, scale, 256, 2048)
  )
  tb_fwd = bc.time_fn(base_fwd, *x, warmup=1, iters=iters)
  tb = bc.time_fn(base_vg, *x, warmup=1, iters=iters)
  shape = {"L": l, "H": 128, "C": x[3].shape[-1], "form": args.form, "J": 64, "D": 128}
  for name in names:
    bsz = VARIANTS[name]
    extra = {
      "variant": name,
      "block_sizes": dataclasses.asdict(bsz),
      "command": "python -m experiments.sweep_dense_kl " + " ".join(sys.argv[1:]),
    }
    if time.time() - t_start > args.budget_s:
      rows.append(bc.row("DENSE_KL", shape, float("nan"), None, skipped="budget", **extra))
      continue
    try:
      fwd, vg = _fns(
        lambda q, k, w, aq, akv, bsz=bsz: kernel_kl_triton.dense_kl(
          q, k, w, aq, akv, None, scale, bsz, interp
        )
      )
      t0 = time.time()
      got = jax.block_until_ready(vg(*x))
      compile_s = time.time() - t0
      ref = ref if ref is not None else got
      err = max(_rel(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
      t_fwd = bc.time_fn(fwd, *x, warmup=1, iters=iters)
      t = bc.time_fn(vg, *x, warmup=1, iters=iters)
      rows.append(
        bc.row(
          "DENSE_KL",
          shape,
          t,
          None,
          fwd_ms=t_fwd,
          compile_s=compile_s,
          rel_err_vs_default=err,
          baseline={"name": "grad.dense_kl (streamed XLA) fwd+bwd", "time_ms": tb},
          baseline_fwd_ms=tb_fwd,
          **extra,
        )
      )
    except Exception as e:  # noqa: BLE001 - record the failure, go on with the next variant
      rows.append(
        bc.row(
          "DENSE_KL", shape, float("nan"), None, error=f"{type(e).__name__}: {e}"[:300], **extra
        )
      )
    print(json.dumps(rows[-1]), flush=True)
    dump()
  dump()


if __name__ == "__main__":
  main()
