# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Where the sparse MLA Mosaic GPU kernels spend a chunk, warpgroup by warpgroup (GPU only).

  python -m experiments.profile_sparse_mla_kernels --out=experiments/results/profile_sparse_mla_kernels.json

JAX_PLATFORMS must leave the CPU backend on (unset, or "cuda,cpu"): the profiler writes its trace
from a host callback. Sets `kernel_mosaic_gpu.PROFILE`, runs the forward and the backward once at
an S1/S3-like shape (128 heads, k 2048 of 32K rows) and reads the Mosaic GPU profiler's traces:
per warpgroup, the mean time (SM clock kilocycles) a CTA spends in each named region of the
kernels (`jax.named_scope` in kernel_mosaic_gpu.py and kernel_mosaic_gpu_bwd.py), its share of the
CTA's time and the time per 64-slot chunk. The profiler's buffer lives in SMEM next to the
kernels' own, which at V3.2's row dim (576) leaves no room, so the default row dim is 512 (value
dims 512: the rope tile goes, the rest of the schedule is V3.2's). The recorded regions cost a few
cycles each; `ms` is the call's time without the profiler (with it, the trace's host callback
dominates the call).
"""

import argparse
import collections
import glob
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc


def region_stats(trace: dict, warpgroups: int) -> dict:
  """{"cta_kcycles": mean CTA time, "warpgroups": {wg: {region: {"kcycles": mean time a CTA,
  "calls": mean count a CTA, "share": of the CTA time}}}} from one Mosaic GPU profiler trace
  (Chrome trace events "B"/"E" per region; tid = 1 + warpgroup + warpgroups * CTA). Within a
  CTA the trace's timestamps advance by SM clock cycles / 1000 (its "us" are kilocycles)."""
  open_at = collections.defaultdict(list)
  spent = collections.defaultdict(float)  # (cta, wg, region) -> kilocycles
  calls = collections.Counter()
  first, last = {}, {}
  for e in trace["traceEvents"]:
    tid = int(e["tid"]) - 1
    cta, wg = divmod(tid, warpgroups)
    ts = float(e["ts"])
    first[cta] = min(first.get(cta, ts), ts)
    last[cta] = max(last.get(cta, ts), ts)
    key = (cta, wg, e["name"])
    if e["ph"] == "B":
      open_at[key].append(ts)
    elif e["ph"] == "E":
      spent[key] += ts - open_at[key].pop()
      calls[key] += 1
  if not first:
    raise ValueError("the trace has no events")
  ctas = len(first)
  cta = float(np.mean([last[c] - first[c] for c in first]))
  out = collections.defaultdict(dict)
  for (_, wg, name), kc in spent.items():
    row = out[wg].setdefault(name, {"kcycles": 0.0, "calls": 0.0})
    row["kcycles"] += kc / ctas
  for (_, wg, name), n in calls.items():
    out[wg][name]["calls"] += n / ctas
  for regions in out.values():
    for row in regions.values():
      row["share"] = row["kcycles"] / cta if cta else 0.0
  return {"cta_kcycles": cta, "ctas": ctas, "warpgroups": {w: out[w] for w in sorted(out)}}


def profile_ranges(n_chunks: int) -> int:
  """Profiler ranges per warpgroup for a kernel of n_chunks 64-slot chunks: at most 8 named
  regions a chunk (the forward's compute warpgroups have 6, the backward's 5), and the rest."""
  return 8 * n_chunks + 16


def _traces(trace_dir: str, prefix: str) -> list[str]:
  return sorted(glob.glob(os.path.join(trace_dir, f"{prefix}*-trace.json")))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--tokens", type=int, default=132, help="query tokens (2 CTAs each)")
  ap.add_argument("--s_kv", type=int, default=32768)
  ap.add_argument("--heads", type=int, default=128)
  ap.add_argument("--d_qk", type=int, default=512)
  ap.add_argument("--d_v", type=int, default=512)
  ap.add_argument("--topk", type=int, default=2048)
  a = ap.parse_args()
  t0 = time.perf_counter()
  if jax.default_backend() != "gpu":
    raise SystemExit("profile_sparse_mla_kernels needs a GPU (the profiler is Mosaic GPU's)")
  try:  # the profiler writes its trace from a host callback, which runs on the CPU backend
    jax.devices("cpu")
  except RuntimeError:
    raise SystemExit(
      f"profile_sparse_mla_kernels needs the CPU backend too (the trace's host callback); "
      f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}: use 'cuda,cpu' or leave it unset"
    ) from None
  from pallas_kernels.sparse_mla import kernel_mosaic_gpu, ops  # noqa: PLC0415

  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(k1, (1, a.tokens, a.heads, a.d_qk), jnp.bfloat16)
  kv = jax.random.normal(k2, (1, a.s_kv, a.d_qk), jnp.bfloat16)
  idx = jax.random.randint(k3, (1, a.tokens, a.topk), 0, a.s_kv, jnp.int32)
  do = jax.random.normal(k4, (1, a.tokens, a.heads, a.d_v), jnp.bfloat16)
  scale = a.d_qk**-0.5

  def build():
    f = lambda q, kv: ops.sparse_mla(q, kv, idx, scale=scale, d_v=a.d_v, impl="pallas")[0]
    fwd = jax.jit(f)
    _, vjp = jax.jit(lambda q, kv: jax.vjp(f, q, kv))(q, kv)
    bwd = jax.jit(lambda vjp, do: vjp(do))
    return (fwd, (q, kv)), (bwd, (vjp, do))

  n_chunks = -(-a.topk // kernel_mosaic_gpu.BLOCK_K)
  plain = {name: bc.time_fn(f, *args) for name, (f, args) in zip(("fwd", "bwd"), build())}
  rows = {}
  with tempfile.TemporaryDirectory() as d:
    kernel_mosaic_gpu.PROFILE = (profile_ranges(n_chunks), d)
    try:
      for name, (f, args) in zip(("fwd", "bwd"), build()):
        jax.block_until_ready(f(*args))  # compiles (and writes a first trace)
        jax.effects_barrier()
        for path in glob.glob(os.path.join(d, "*-trace.json")):
          os.remove(path)
        jax.block_until_ready(f(*args))
        jax.effects_barrier()  # the trace is written by a host callback
        prefix = {"fwd": "sparse_mla_fwd_kernel", "bwd": "sparse_mla_bwd_kernel"}[name]
        paths = _traces(d, prefix)
        if not paths:
          raise RuntimeError(f"no {prefix} trace in {os.listdir(d)}")
        with open(paths[-1]) as fh:
          stats = region_stats(json.load(fh), warpgroups=3)
        stats.update(ms=plain[name], chunk_kcycles=stats["cta_kcycles"] / n_chunks)
        rows[name] = stats
        cta = stats["cta_kcycles"]
        print(f"{name}: {plain[name]:.3f} ms a call; CTA {cta:.1f} kcycles (profiled)")
        for wg, regions in stats["warpgroups"].items():
          top = sorted(regions.items(), key=lambda kv: -kv[1]["kcycles"])
          print(f"  WG{wg}: " + ", ".join(f"{k} {v['share']:.0%}" for k, v in top))
    finally:
      kernel_mosaic_gpu.PROFILE = None
  shape = dict(tokens=a.tokens, s_kv=a.s_kv, h=a.heads, d_qk=a.d_qk, d_v=a.d_v, topk=a.topk)
  row = bc.row(
    "PROFILE_SPARSE_MLA",
    shape,
    rows["fwd"]["ms"],
    None,
    kernels=rows,
    command=bc.command("experiments.profile_sparse_mla_kernels"),
    note="Mosaic GPU profiler, one call per kernel; shares are of the CTA's first-to-last event",
  )
  bc.write_results(a.out, [row])
  print(f"wrote {a.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  main()
