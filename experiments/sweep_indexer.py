# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""I1 sweep of the FP8 lightning-indexer logits kernel's block sizes (heads_m and keys_m).

  python -m experiments.sweep_indexer --out=experiments/results/indexer_sweep.json
  python -m experiments.sweep_indexer --small --out=/tmp/sweep.json   # CPU, GPU interpret mode

At I1 (B=1, L=32768 causal, 64 heads, dim 128, inputs pre-quantised, default q_offset) it times the
existing kernel (variant "heads_m", default block sizes) and each `keys_m` configuration in
CONFIGS, checks each against the existing kernel's output on the first and last `check_rows`
query rows (same -inf mask, rel_err on the finite logits), and times the fp8 XLA GEMM 8192^3 with
f32 output in the same run as the ceiling: ratio = fraction of that GEMM's throughput. A config
that fails to lower, compile or run gets a row with its error and the sweep goes on.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from pallas_kernels.lightning_indexer import kernel_mosaic_gpu as lik

B = lik.BlockSizes

# (name, BlockSizes); the first is the existing kernel and the reference for rel_err.
CONFIGS = [
  ("heads_m_default", B(16, 128)),
  ("keys_m_q4_s3", B(16, 128, "keys_m", q_per_mma=4, stages=3)),
  ("keys_m_q2_s3", B(16, 128, "keys_m", q_per_mma=2, stages=3)),
  ("keys_m_bq8_q4_s4", B(8, 128, "keys_m", q_per_mma=4, stages=4)),
]


def _rand(seed, shape, dtype=jnp.float32, scale=1.0):
  return (scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def _gemm_ceiling(m, iters):
  a8 = _rand(3, (m, m), jnp.float8_e4m3fn)
  b8 = _rand(4, (m, m), jnp.float8_e4m3fn)
  g = jax.jit(
    lambda a, b: jax.lax.dot_general(
      a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
  )
  tg = bc.time_fn(g, a8, b8, iters=iters)
  return tg, 2.0 * m**3


def _write(path, rows):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"results": rows}, f, indent=1)
  os.replace(path + ".tmp", path)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--small", action="store_true", help="tiny shapes (GPU interpret mode on CPU)")
  p.add_argument("--only", default="", help="comma-separated config names (default: all)")
  p.add_argument("--budget_s", type=float, default=170.0, help="skip configs past this time")
  args = p.parse_args(argv)
  command = "python -m experiments.sweep_indexer " + " ".join(
    sys.argv[1:] if argv is None else argv
  )
  t_start = time.time()

  small = args.small
  interp = None
  if small and jax.default_backend() == "cpu":
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

    interp = plgpu.InterpretGPUParams()
  l, j, d = (128, 64, 128) if small else (32768, 64, 128)
  warmup, iters = (1, 1) if small else (2, 10)
  check_rows = min(l, 1024)
  flops = 2 * j * d * l * (l + 1) / 2
  shape = {"B": 1, "L": l, "H_I": j, "d_I": d, "causal": True}

  q = _rand(0, (1, l, j, d))
  k = _rand(1, (1, l, d))
  w = _rand(2, (1, l, j), scale=1.0 / np.sqrt(j * d))
  q8, k8, wq, ks = jax.jit(lik.prepare_fp8)(q, k, w)
  del q, k, w

  m = 256 if small else 8192
  tg, gflops = _gemm_ceiling(m, iters)
  base = {
    "name": f"xla_fp8_gemm_{m}^3_f32out_scaled_to_same_flops",
    "time_ms": tg * flops / gflops,
    "tflops": gflops / (tg * 1e-3) / 1e12,
  }
  print(f"fp8 GEMM {m}^3: {tg:.3f} ms = {base['tflops']:.0f} TFLOP/s", flush=True)

  only = {c for c in args.only.split(",") if c}
  old = []
  if os.path.exists(args.out):
    with open(args.out) as f:
      old = json.load(f).get("results", [])
  ref_rows = ref_name = None
  rows = []
  for name, bs in CONFIGS:
    if only and name not in only and name != CONFIGS[0][0]:
      continue
    extra = {"config": name, "block_sizes": dataclasses.asdict(bs)}
    if time.time() - t_start > args.budget_s:
      rows.append(bc.row("I1-sweep", shape, None, None, error="skipped: time budget", **extra))
      continue
    t0 = time.time()
    try:
      f = jax.jit(
        lambda *a, bs=bs: lik.logits_fp8(*a, block_sizes=bs, causal=True, interpret=interp)
      )
      out = f(q8, k8, wq, ks)
      sl = np.concatenate(
        [np.asarray(out[0, :check_rows]), np.asarray(out[0, l - check_rows :])], axis=0
      )
      del out
      compile_s = time.time() - t0
      if ref_rows is None:  # the existing kernel, unless it failed
        ref_rows, ref_name = sl, name
      mask_ok = bool(np.array_equal(np.isneginf(sl), np.isneginf(ref_rows)))
      fin = np.isfinite(ref_rows)
      err = bc.rel_err(np.where(fin, sl, 0.0), np.where(fin, ref_rows, 0.0))
      t = bc.time_fn(f, q8, k8, wq, ks, warmup=warmup, iters=iters)
      r = bc.row(
        "I1-sweep",
        shape,
        t,
        flops,
        rel_err=err,
        mask_ok=mask_ok,
        compile_s=compile_s,
        baseline=base,
        **extra,
      )
      print(
        f"{name:28s} {t:9.3f} ms {r['tflops']:7.1f} TFLOP/s ratio {r['ratio']:.3f} "
        f"rel_err {err:.2e} mask_ok {mask_ok} (compile+first run {compile_s:.1f} s)",
        flush=True,
      )
    except Exception as e:  # noqa: BLE001 - record and go on to the next config
      msg = f"{type(e).__name__}: {str(e)[:600]}"
      r = bc.row("I1-sweep", shape, None, None, error=msg, **extra)
      print(f"{name:28s} FAILED {msg[:300]}", flush=True)
      if interp is not None:  # a failed interpreted kernel leaves state behind
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # noqa: PLC0415

        gpu_callbacks.reset_gpu_interpret_mode_state()
    r["command"] = command
    r["reference_config"] = ref_name
    rows.append(r)
    _write(args.out, old + rows)  # after every config: a later hang still leaves these rows
  print(f"wrote {len(rows)} rows to {args.out} in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
  main()
