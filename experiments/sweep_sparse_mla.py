# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sweep of the Triton sparse-MLA variants (ops.TritonConfig) at S1 shapes, for one H200 run.

  python -m experiments.sweep_sparse_mla --out=PATH.json   # GPU, S1 shapes, < 4 min
  python -m experiments.sweep_sparse_mla --small --out=/tmp/s.json   # tiny shapes, CPU interpret

Forward: each case runs ops.sparse_mla(impl="pallas", triton_config=case) (op-level, padding and
slot sorting included). Backward: each case runs the op's custom-VJP backward rule
(ops._sparse_mla_triton_bwd) on the residuals of one default forward, with both cotangents (out
and lse): exactly what jax.vjp runs, but one forward serves every case. The default's backward is
also timed through jax.vjp as experiments/bench_sparse_mla.py does (row "default_via_jax_vjp"),
to show the two agree. Rel errs are vs the Triton default (ops.TRITON_DEFAULT_VARIANT).
All cases are lowered first, compiled (defaults alone, then the rest in parallel threads), then
run one at a time in list order until --budget_s is spent; a failing case records its error and
the sweep goes on. --only=a,b re-runs chosen cases (plus the defaults).
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import json
import os
import time

import jax
import jax.numpy as jnp

from experiments import bench_common
from pallas_kernels.sparse_mla import kernel_triton, ops

SCALE = 576**-0.5
_S1 = dict(s_q=4096, s_kv=32768, h=128, d_qk=576, d_v=512, topk=2048)
_SMALL = dict(s_q=4, s_kv=96, h=64, d_qk=128, d_v=64, topk=128)

BASE = ops.TRITON_VARIANTS[ops.TRITON_DEFAULT_VARIANT]
BS, BWD, DKV = kernel_triton.BlockSizes, kernel_triton.BwdBlockSizes, kernel_triton.DkvBlockSizes


def _fwd(**kw):
  return dataclasses.replace(BASE, fwd=dataclasses.replace(BASE.fwd, **kw))


def _cfg(name=None, **kw):
  return dataclasses.replace(ops.TRITON_VARIANTS[name] if name else BASE, **kw)


# In priority order (the budget cuts the tail). Offline Triton 3.6 + ptxas figures at S1 shapes
# (SMEM bytes / registers / spill bytes) in the comments; the default fwd is 221440 / 255 / 508.
FWD_CASES = [
  ("default", BASE),
  ("vsplit2_ns3", _fwd(value_split=2, num_stages=3)),  # 221952 / 255 / 108
  ("vsplit4_ns3", _fwd(value_split=4, num_stages=3)),  # 221952 / 255 / 124
  ("vsplit4", _fwd(value_split=4)),  # 221440 / 255 / 176
  ("vsplit2", _fwd(value_split=2)),  # 221440 / 255 / 428
  ("ns3", _fwd(num_stages=3)),  # 221952 / 255 / 588
  ("nw16", _fwd(num_warps=16)),  # 221440 / 128 / 500
  ("prefetch_idx", _fwd(prefetch_idx=True)),  # 221184 / 255 / 724 (with ns3: 294912, too big)
  ("prefetch_idx_bk32_ns3", _fwd(block_k=32, num_stages=3, prefetch_idx=True)),  # 184320 / 528
  ("sort_idx", _cfg(sort_idx=True)),  # + a sort of [s_q, topk] per call
  ("bh128_bk32_nw16", _fwd(block_h=128, block_k=32, num_warps=16)),  # ptxas: needs 158 regs
]
BWD_CASES = [
  ("default", BASE),
  ("hybrid", _cfg("triton_hybrid_bwd")),  # dq: 212992 / 255 / 1560; dkv: 163840 / 97 / 0
  ("triton_relaxed", _cfg("triton_relaxed_bwd")),  # 212992 / 255 / 1756
  ("xla_fused", _cfg(bwd="xla_fused")),
  ("xla_bf16upd", _cfg(xla_bf16_updates=True)),
  ("xla_fused_bf16upd", _cfg(bwd="xla_fused", xla_bf16_updates=True)),
  ("hybrid_xla_bt256", _cfg("triton_hybrid_xla_bwd")),
  (
    "hybrid_xla_bt1024_bf16upd",
    _cfg("triton_hybrid_xla_bwd", xla_block_t=1024, xla_bf16_updates=True),
  ),
  ("hybrid_dq_c256", _cfg("triton_hybrid_bwd", bwd_bs=BWD(col_block=256))),  # dq spill 772
  ("hybrid_dq_bk32_ns2", _cfg("triton_hybrid_bwd", bwd_bs=BWD(block_k=32, num_stages=2))),
  ("hybrid_dkv_c256_ns1", _cfg("triton_hybrid_bwd", dkv_bs=DKV(col_block=256, num_stages=1))),
  ("hybrid_dkv_ns3", _cfg("triton_hybrid_bwd", dkv_bs=DKV(num_stages=3))),  # 196608 SMEM
  ("hybrid_dkv_acqrel", _cfg("triton_hybrid_bwd", dkv_bs=DKV(relaxed_atomics=False))),
  ("xla_bt32", _cfg(xla_block_t=32)),
  ("xla_bt128", _cfg(xla_block_t=128)),
  ("xla_fused_bt128_bf16upd", _cfg(bwd="xla_fused", xla_block_t=128, xla_bf16_updates=True)),
  (
    "hybrid_xla_bt4096_bf16upd",
    _cfg("triton_hybrid_xla_bwd", xla_block_t=4096, xla_bf16_updates=True),
  ),
  ("triton_acqrel", _cfg("triton")),  # the old Triton bwd (139 ms on H200)
  # Bigger scan steps of the default (fused, bf16 rows): fewer, larger gathers and scatters.
  ("xla_fused_bt256_bf16upd", _cfg(xla_block_t=256)),
  ("xla_fused_bt512_bf16upd", _cfg(xla_block_t=512)),
  ("xla_fused_bt1024_bf16upd", _cfg(xla_block_t=1024)),
  ("xla_fused_bt2048_bf16upd", _cfg(xla_block_t=2048)),
]


def _fwd_flops(s):
  return 2 * s["s_q"] * s["h"] * s["topk"] * (s["d_qk"] + s["d_v"])


def _bwd_flops(s):
  return 2 * s["s_q"] * s["h"] * s["topk"] * (3 * s["d_qk"] + 2 * s["d_v"])


def _err(e):
  return f"{type(e).__name__}: {str(e)[:400]}"


def _flat_bwd_args(q, kv, idx, out, lse, d_out, d_lse, d_v, bs):
  """The hybrid backward's kernel inputs, as ops._triton_bwd_call builds them."""
  b, t, h, _ = q.shape
  qf, kvf, gidx, da, db, hp = ops._triton_flat(q, kv, idx, d_v, bs.block_h, bs.block_k)
  delta = jnp.einsum("bthv,bthv->bth", out.astype(jnp.float32), d_out.astype(jnp.float32))
  d_lse = jnp.where(jnp.isfinite(lse), d_lse, 0.0)
  heads = lambda x, fill=0.0: jnp.pad(
    x.reshape(b * t, h), ((0, 0), (0, hp - h)), constant_values=fill
  )
  dof = jnp.pad(d_out, ((0, 0), (0, 0), (0, hp - h), (0, da - d_v))).reshape(b * t, hp, da)
  args = (qf, kvf, gidx, dof, heads(lse, jnp.inf), heads(delta), heads(d_lse))
  return args, da, db


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--small", action="store_true", help="tiny shapes in CPU interpret mode")
  ap.add_argument("--budget_s", type=float, default=200.0, help="stop starting cases after this")
  ap.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1))
  ap.add_argument("--only", default="", help="comma-separated case names (all if empty)")
  a = ap.parse_args()
  t_start = time.perf_counter()
  shp = _SMALL if a.small else _S1
  interp = a.small and jax.default_backend() == "cpu"
  only = set(filter(None, a.only.split(",")))
  keep = lambda name: not only or name in only or name == "default"
  d_v, iters = shp["d_v"], (2 if a.small else 10)

  k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(k1, (1, shp["s_q"], shp["h"], shp["d_qk"]), jnp.bfloat16)
  kv = jax.random.normal(k2, (1, shp["s_kv"], shp["d_qk"]), jnp.bfloat16)
  idx = jax.random.randint(k3, (1, shp["s_q"], shp["topk"]), 0, shp["s_kv"], jnp.int32)
  do = jax.random.normal(k4, q.shape[:-1] + (d_v,), jnp.bfloat16)
  dl = jax.random.normal(k5, q.shape[:-1], jnp.float32)
  cts = (do, dl)

  # One default forward for every backward case's residuals (q, kv, idx, out, lse).
  res_fn = jax.jit(
    lambda q, kv, idx: ops._sparse_mla_triton_fwd(q, kv, idx, SCALE, d_v, interp, BASE)[1]
  )
  res = jax.block_until_ready(res_fn(q, kv, idx))

  jobs = []  # (section, name, cfg, jitted fn, args)
  for name, cfg in FWD_CASES:
    if keep(name):
      op = functools.partial(
        ops.sparse_mla, scale=SCALE, d_v=d_v, impl="pallas", interpret=interp, triton_config=cfg
      )
      jobs.append(("forward", name, cfg, jax.jit(op), (q, kv, idx)))
  for name, cfg in BWD_CASES:
    if keep(name):
      rule = lambda res, cts, cfg=cfg: ops._sparse_mla_triton_bwd(
        SCALE, d_v, interp, cfg, res, cts
      )[:2]
      jobs.append(("backward", name, cfg, jax.jit(rule), (res, cts)))
  # The default through jax.vjp (bench_sparse_mla's protocol) and the hybrid's two kernels alone.
  op = functools.partial(
    ops.sparse_mla, impl="pallas", scale=SCALE, d_v=d_v, interpret=interp, triton_config=BASE
  )
  vjp = jax.jit(lambda q, kv, idx: jax.vjp(lambda q, kv: op(q, kv, idx), q, kv)[1])(q, kv, idx)
  jobs.append(("backward", "default_via_jax_vjp", BASE, jax.jit(lambda f, c: f(c)), (vjp, cts)))
  hyb = ops.TRITON_VARIANTS["triton_hybrid_bwd"]

  def dq_probe(res, cts):
    args, da, db = _flat_bwd_args(*res, *cts, d_v, hyb.bwd_bs)
    return kernel_triton.sparse_mla_bwd_dq_triton(
      *args, scale=SCALE, da=da, db=db, bs=hyb.bwd_bs, interpret=interp
    )

  def dkv_probe(res, cts, dsp):
    args, da, db = _flat_bwd_args(*res, *cts, d_v, hyb.bwd_bs)
    return kernel_triton.sparse_mla_dkv_triton(
      dsp, args[0], args[3], args[2], r=kv.shape[1], da=da, db=db, bs=hyb.dkv_bs, interpret=interp
    )

  probes = [("probe_hybrid_dq_kernel", jax.jit(dq_probe)), ("probe_hybrid_dkv_kernel", None)]

  # Lower in this thread (Python tracing), compile in parallel (XLA + Triton + ptxas in C++).
  lowered = {}
  for sec, name, _, fn, args in jobs:
    try:
      lowered[(sec, name)] = fn.lower(*args)
    except Exception as e:  # noqa: BLE001 - a failing variant is a finding, keep going
      lowered[(sec, name)] = e
  try:
    lowered[("probes", probes[0][0])] = probes[0][1].lower(res, cts)
  except Exception as e:  # noqa: BLE001
    lowered[("probes", probes[0][0])] = e

  def compile_one(key):
    lo = lowered[key]
    if isinstance(lo, Exception):
      return key, lo
    try:
      return key, lo.compile()
    except Exception as e:  # noqa: BLE001
      return key, e

  # Defaults first, alone: XLA autotunes GEMMs on the device while compiling, and parallel
  # compiles share it (confirm a close call with --only=NAME --threads=1).
  first = [k for k in lowered if k[1] == "default"]
  compiled = dict(compile_one(k) for k in first)
  with concurrent.futures.ThreadPoolExecutor(max(1, a.threads)) as pool:
    compiled.update(pool.map(compile_one, [k for k in lowered if k not in compiled]))
  t_compiled = time.perf_counter() - t_start
  print(f"lowered + compiled {len(compiled)} cases in {t_compiled:.0f} s", flush=True)

  flops = {"forward": _fwd_flops(shp), "backward": _bwd_flops(shp)}
  ref, out = {}, {"forward": [], "backward": [], "probes": []}
  for sec, name, cfg, _, args in jobs:
    row, got = {"name": name, "config": dataclasses.asdict(cfg)}, None
    c = compiled[(sec, name)]
    if name != "default" and time.perf_counter() - t_start > a.budget_s:
      row["error"] = "skipped: time budget"
    elif isinstance(c, Exception):
      row["error"] = _err(c)
    else:
      try:
        got = jax.block_until_ready(c(*args))
        t = bench_common.time_fn(c, *args, iters=iters if sec == "forward" else max(2, iters // 2))
        row.update(time_ms=t, tflops=flops[sec] / (t * 1e-3) / 1e12)
        if name == "default":
          ref[sec] = got
        base = ref.get(sec)
        if base is not None:
          tags = ("out", "lse") if sec == "forward" else ("dq", "dkv")
          for tag, x, y in zip(tags, got, base):
            row[f"rel_err_{tag}"] = bench_common.rel_err(x, y)
        default_row = next((r for r in out[sec] if r["name"] == "default"), None)
        if default_row and default_row.get("time_ms"):
          row["speedup_vs_default"] = default_row["time_ms"] / t
      except Exception as e:  # noqa: BLE001
        row["error"] = _err(e)
      del got
    out[sec].append(row)
    print(sec, name, {k: v for k, v in row.items() if k != "config"}, flush=True)

  # Probes: the hybrid's dq kernel alone, then its dkv kernel alone on that kernel's dS/P.
  for name, _ in probes:
    row = {"name": name}
    try:
      if name == "probe_hybrid_dq_kernel":
        c = compiled[("probes", name)]
        if isinstance(c, Exception):
          raise c
        dsp = jax.block_until_ready(c(res, cts))[1]
        row["time_ms"] = bench_common.time_fn(c, res, cts, iters=max(2, iters // 2))
      else:
        c = jax.jit(dkv_probe).lower(res, cts, dsp).compile()
        row["time_ms"] = bench_common.time_fn(c, res, cts, dsp, iters=max(2, iters // 2))
    except Exception as e:  # noqa: BLE001
      row["error"] = _err(e)
    out["probes"].append(row)
    print("probe", row, flush=True)

  meta = {
    "date": datetime.date.today().isoformat(),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "commit": bench_common.commit(),
    "command": "python -m experiments.sweep_sparse_mla "
    + " ".join(f"--{k}={v}" for k, v in vars(a).items() if v not in ("", False, None)),
    "shape": shp,
    "default_variant": ops.TRITON_DEFAULT_VARIANT,
    "flops": {"forward": "2*s_q*h*topk*(d_qk+d_v)", "backward": "2*s_q*h*topk*(3*d_qk+2*d_v)"},
    "compile_s": t_compiled,
    "total_s": time.perf_counter() - t_start,
  }
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as f:
    json.dump({"meta": meta, **out}, f, indent=1)
  print(f"wrote {a.out} in {meta['total_s']:.0f} s")


if __name__ == "__main__":
  main()
