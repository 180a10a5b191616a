# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""TPU suites for the Mosaic TPU kernels (docs/benchmarks.md), one command on a TPU VM:

  python -m experiments.bench --suite=S1_TPU,S2_TPU,S3_TPU,I1_TPU,T1_TPU \
      --out=experiments/results/tpu.json
  python -m experiments.bench --suite=RECALL_TPU      # CPU is fine: numerics vs the FP8 selection
  python -m experiments.bench --suite=S1_TPU,I1_TPU --small   # CPU smoke test (TPU interpreter)

Baselines (measured in the same run; FlashMLA/cuDNN do not exist on TPU):
  S1/S2_TPU: XLA gather reference (ops impl="reference");  S3_TPU: XLA autodiff of it;
  I1_TPU: one row per numerics (fp8/int8/bf16) vs an XLA GEMM of the same FLOPs in the same dtype
          (so the ratio is the fraction of that ceiling);
  T1_TPU: approx_max_k(0.95) vs exact lax.top_k, with the measured recall.
RECALL_TPU measures how often the int8 / bf16 (and f32) indexer selections agree with the FP8
definition (docs/dsa.md §Indexer), with the XLA emulation of each kernel's arithmetic.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common
from pallas_kernels.lightning_indexer import kernel_tpu as idx_tpu
from pallas_kernels.sparse_mla import ops as mla_ops
from pallas_kernels.topk import kernel_tpu as topk_tpu

SCALE = 576**-0.5
_MLA = {
  "S1_TPU": dict(s_q=4096, s_kv=32768, h=128, d_qk=576, d_v=512, topk=2048),
  "S2_TPU": dict(s_q=8192, s_kv=131072, h=128, d_qk=576, d_v=512, topk=2048),
  "S3_TPU": dict(s_q=4096, s_kv=32768, h=128, d_qk=576, d_v=512, topk=2048),
}
_MLA_SMALL = dict(s_q=2, s_kv=96, h=16, d_qk=128, d_v=64, topk=128)


def _on_tpu():
  return jax.default_backend() == "tpu"


def _interp(small):
  if _on_tpu():
    return False
  if not small:
    raise SystemExit("TPU suites need a TPU (or --small for the CPU interpreter smoke test)")
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

  return pltpu.InterpretParams()


def _mla_inputs(shp, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(k1, (1, shp["s_q"], shp["h"], shp["d_qk"]), jnp.bfloat16)
  kv = jax.random.normal(k2, (1, shp["s_kv"], shp["d_qk"]), jnp.bfloat16)
  idx = jax.random.randint(k3, (1, shp["s_q"], shp["topk"]), 0, shp["s_kv"], jnp.int32)
  return q, kv, idx


def _mla(suite, small):
  shp = _MLA_SMALL if small else _MLA[suite]
  q, kv, idx = _mla_inputs(shp)
  d_v = shp["d_v"]
  ip = _interp(small)
  fn = lambda impl, **kw: functools.partial(
    mla_ops.sparse_mla, scale=SCALE, d_v=d_v, impl=impl, **kw
  )
  ours_f = fn("pallas", backend="tpu", interpret=ip)
  ref_f = fn("reference")
  n = 2 * shp["s_q"] * shp["h"] * shp["topk"]
  if suite == "S3_TPU":
    do = jax.random.normal(jax.random.key(9), (1, shp["s_q"], shp["h"], d_v), jnp.bfloat16)

    def grads(f):
      def g(q, kv, idx):
        (o, l), vjp = jax.vjp(lambda q, kv: f(q, kv, idx), q, kv)
        return vjp((do, jnp.zeros_like(l)))

      return jax.jit(g)

    ours, ref = grads(ours_f), grads(ref_f)
    flops = n * (3 * shp["d_qk"] + 2 * d_v)
    base_name = "xla_autodiff_reference"
  else:
    ours, ref = jax.jit(ours_f), jax.jit(ref_f)
    flops = n * (shp["d_qk"] + d_v)
    base_name = "xla_gather_reference"
  a, b = ours(q, kv, idx), ref(q, kv, idx)
  err = max(bench_common.rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  iters = 1 if small else 10
  t_ours = bench_common.time_fn(ours, q, kv, idx, iters=iters, warmup=1)
  t_ref = bench_common.time_fn(ref, q, kv, idx, iters=iters, warmup=1)
  base = {"name": base_name, "time_ms": t_ref, "tflops": flops / (t_ref * 1e-3) / 1e12}
  return [bench_common.row(suite, shp, t_ours, flops, rel_err=err, baseline=base)]


def _indexer(suite, small):
  l, j, d = (256, 64, 128) if small else (32768, 64, 128)
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (1, l, j, d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, l, d), jnp.bfloat16)
  w = jax.random.normal(ks[2], (1, l, j), jnp.float32) * 0.1
  ip = _interp(small)
  flops = 2 * j * d * l * (l + 1) // 2
  rows = []
  for numerics in idx_tpu.NUMERICS:
    ours = jax.jit(functools.partial(idx_tpu.indexer_logits_tpu, numerics=numerics, interpret=ip))
    try:
      out = ours(q, k, w)
    except Exception as e:  # noqa: BLE001 - e.g. fp8 on v5p or int8 on v7: record, go on
      rows.append(bench_common.row(suite, {"L": l, "numerics": numerics}, None, None, error=str(e)))
      continue
    emu = idx_tpu.emulate_logits(q, k, w, numerics)
    fin = jnp.isfinite(emu)
    err = bench_common.rel_err(jnp.where(fin, out, 0), jnp.where(fin, emu, 0))
    t_ours = bench_common.time_fn(ours, q, k, w, iters=1 if small else 10, warmup=1)
    # same-FLOP dense GEMM in the same operand dtype: [L, J·D] x [J·D, L/2] -> f32
    dt = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8, "bf16": jnp.bfloat16}[numerics]
    acc = jnp.int32 if numerics == "int8" else jnp.float32
    a = jnp.ones((l, j * d), dt)
    b = jnp.ones((j * d, l // 2), dt)
    gemm = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=acc))
    t_gemm = bench_common.time_fn(gemm, a, b, iters=1 if small else 10, warmup=1)
    base = {"name": f"xla_gemm_{numerics}", "time_ms": t_gemm, "tflops": flops / t_gemm / 1e9}
    shape = {"L": l, "J": j, "D": d, "numerics": numerics}
    rows.append(bench_common.row(suite, shape, t_ours, flops, rel_err=err, baseline=base))
  return rows


def _recall(a, b):
  """Mean over rows of |a ∩ b| / |b| (b = the FP8 selection), valid slots only."""
  a, b = np.asarray(a), np.asarray(b)
  out = []
  for ra, rb in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])):
    sb = set(rb[rb >= 0].tolist())
    out.append(len(set(ra[ra >= 0].tolist()) & sb) / max(len(sb), 1))
  return float(np.mean(out))


def _topk(suite, small):
  r, s, k = (64, 4096, 256) if small else (32768, 32768, 2048)
  x = jax.random.normal(jax.random.key(0), (r, s), jnp.float32)
  x = jnp.where(jnp.arange(s)[None, :] <= (s - r + jnp.arange(r))[:, None], x, -jnp.inf)
  exact = jax.jit(functools.partial(topk_tpu.topk_tpu, k=k))
  approx = jax.jit(functools.partial(topk_tpu.topk_tpu, k=k, recall_target=0.95))
  rec = _recall(approx(x), exact(x))
  t_a = bench_common.time_fn(approx, x, iters=2 if small else 10)
  t_e = bench_common.time_fn(exact, x, iters=2 if small else 10)
  base = {"name": "lax.top_k", "time_ms": t_e, "tflops": None}
  shape = {"rows": r, "s": s, "k": k, "recall_target": 0.95}
  return [bench_common.row(suite, shape, t_a, None, recall=rec, baseline=base)]


def recall_study(small=False):
  """Recall of the int8 / bf16 / f32 indexer top-k sets against the FP8 selection.

  T queries = the last T of L keys (causal), J=64, D=128, w ~ N(0, 1)/8. Inputs: "gaussian" iid
  N(0,1) q and k; "outliers": 4 of 128 channels scaled x10, then the Hadamard rotation the spec
  applies before quantisation (docs/dsa.md §Indexer). Rows with <= k visible keys are left out
  (every key is selected there).
  """
  l, t = (1024, 64) if small else (4096, 512)
  j, d = 64, 128
  h = np.array([[1.0]])
  while h.shape[0] < d:
    h = np.block([[h, h], [h, -h]])
  had = jnp.asarray(h / np.sqrt(d), jnp.float32)
  rows = []
  for dist in ("gaussian", "outliers"):
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (1, t, j, d))
    k = jax.random.normal(ks[1], (1, l, d))
    w = jax.random.normal(ks[2], (1, t, j)) / 8
    if dist == "outliers":
      boost = jnp.ones(d).at[:4].set(10.0)
      q, k = (q * boost) @ had, (k * boost) @ had
    logits = {n: idx_tpu.emulate_logits(q, k, w, n) for n in ("fp8", "int8", "bf16")}
    logits["f32"] = _f32_logits(q, k, w)
    for topk in (l // 16, l // 2):
      keep = (l - t + np.arange(t) + 1) > topk  # rows with more visible keys than topk
      sel = {n: np.asarray(topk_tpu.topk_tpu(v, topk))[0][keep] for n, v in logits.items()}
      rec = {n: _recall(sel[n], sel["fp8"]) for n in ("int8", "bf16", "f32")}
      rec_exact = {n: _recall(sel[n], sel["f32"]) for n in ("fp8", "int8", "bf16")}
      shape = {"L": l, "T": t, "J": j, "D": d, "topk": topk, "inputs": dist}
      print(f"{shape}: recall vs fp8 selection {rec}; vs exact f32 selection {rec_exact}")
      rows.append(
        bench_common.row(
          "RECALL_TPU", shape, None, None, recall_vs_fp8=rec, recall_vs_f32=rec_exact
        )
      )
  return rows


def _f32_logits(q, k, w):
  t, l = q.shape[1], k.shape[1]
  z = jnp.einsum("btjd,bsd->btjs", q, k, precision="highest")
  i = jnp.einsum("btj,btjs->bts", w, jnp.maximum(z, 0.0), precision="highest")
  vis = jnp.arange(l)[None, :] <= (l - t + jnp.arange(t))[:, None]
  return jnp.where(vis[None], i, -jnp.inf)


SUITES = {
  "S1_TPU": functools.partial(_mla, "S1_TPU"),
  "S2_TPU": functools.partial(_mla, "S2_TPU"),
  "S3_TPU": functools.partial(_mla, "S3_TPU"),
  "I1_TPU": functools.partial(_indexer, "I1_TPU"),
  "T1_TPU": functools.partial(_topk, "T1_TPU"),
  "RECALL_TPU": recall_study,
}
