# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Indexer benchmarks: I1 FP8 logits, T1 causal top-k, E1 one DSA layer fwd+bwd.

Conventions: docs/benchmarks.md.

  python -m experiments.bench --suite=I1,T1,E1 --out=experiments/results/indexer.json

I1: our Mosaic GPU FP8 logits kernel (causal L x L, H_I=64, d_I=128; inputs pre-quantised, like a
    model that keeps the FP8 cache) vs an fp8 XLA GEMM 8192^3 (f32 out) measured in the same run,
    its time scaled to the same FLOPs: ratio = fraction of that GEMM ceiling.
T1: topk/kernel_triton.py select on causal [L, L] f32 scores, k=2048, vs lax.top_k (a full CUB sort).
    Main row: with per-row causal lengths (what the fused indexer path uses); `full_scan` in the row
    is the same kernel without lengths (scans every column, -inf masked).
E1: one DSA layer fwd+bwd = FP8 indexer + top-k (pallas) + sparse MLA (pallas if it runs, else
    the reference; the row says which) + sparse indexer KL, vs cuDNN causal MHA (h=128,
    d_qk=192, V padded to 192) fwd+bwd. E1_LENGTHS=32768,65536 picks lengths; E1_PARTS=1 adds
    each part's time alone (`parts_ms`: indexer+top-k, sparse MLA fwd and fwd+bwd, probs, KL).
    E1_SPARSE_KL=kernels|xla: the sparse indexer KL on the Pallas-Triton kernels or the streamed
    XLA path (default: lightning_indexer.ops.SPARSE_KL_KERNELS_BY_DEFAULT; `sparse_kl` in the
    row). The indexer q and k are bf16 (what the model hands the indexer ops; rows before
    2026-12-06 used f32, which the sparse-KL kernels run several times slower), w f32.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from pallas_kernels.lightning_indexer import kernel_mosaic_gpu as lik
from pallas_kernels.lightning_indexer import ops as li_ops
from pallas_kernels.topk import kernel_triton as tk
from pallas_kernels.topk import reference as tref


def _rand(seed, shape, dtype=jnp.float32, scale=1.0):
  return (scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def _interp(small):
  return small and jax.default_backend() == "cpu"


def suite_i1(small: bool):
  l, j, d = (256, 64, 128) if small else (32768, 64, 128)
  interp = _interp(small)
  q = _rand(0, (1, l, j, d))
  k = _rand(1, (1, l, d))
  w = _rand(2, (1, l, j), scale=1.0 / np.sqrt(j * d))
  q8, k8, wq, ks = jax.jit(lik.prepare_fp8)(q, k, w)
  bs = lik.BlockSizes.default_for(l, l)
  from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

  f = jax.jit(
    lambda *a: lik.logits_fp8(
      *a, block_sizes=bs, causal=True, interpret=plgpu.InterpretGPUParams() if interp else None
    )
  )
  out = f(q8, k8, wq, ks)
  n = min(l, 1024)
  qd = q8[:, :n].astype(jnp.float32) * (wq[:, :n] / w[:, :n])[..., None]
  kd = k8[:, :n].astype(jnp.float32) * ks[:, :n, None]
  with jax.default_matmul_precision("highest"):  # GPU default f32 dots are TF32-class
    ref = li_ops.indexer_logits(qd, kd, w[:, :n])
  o, r = np.asarray(out[0, :n, :n]), np.asarray(ref[0])
  fin = np.isfinite(r)
  assert np.array_equal(fin, np.isfinite(o)), "causal mask mismatch"
  err = bc.rel_err(o[fin], r[fin])
  t = bc.time_fn(f, q8, k8, wq, ks, iters=3 if small else 10)
  flops = 2 * j * d * l * (l + 1) / 2
  m = 256 if small else 8192
  a8 = _rand(3, (m, m), jnp.float8_e4m3fn)
  b8 = _rand(4, (m, m), jnp.float8_e4m3fn)
  g = jax.jit(
    lambda a, b: jax.lax.dot_general(
      a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
  )
  tg = bc.time_fn(g, a8, b8, iters=3 if small else 10)
  gflops = 2.0 * m**3
  base = {
    "name": f"xla_fp8_gemm_{m}^3_f32out_scaled_to_same_flops",
    "time_ms": tg * flops / gflops,
    "tflops": gflops / (tg * 1e-3) / 1e12,
  }
  return [
    bc.row(
      "I1",
      {"L": l, "H_I": j, "d_I": d, "causal": True, "block_q": bs.block_q, "block_k": bs.block_k},
      t,
      flops,
      rel_err=err,
      baseline=base,
    )
  ]


def suite_t1(small: bool):
  l, k = (512, 64) if small else (32768, 2048)
  interp = _interp(small)
  x = _rand(5, (l, l))
  x = jnp.round(x * 64) / 64  # some exact ties
  x = jnp.where(jnp.arange(l)[None, :] <= jnp.arange(l)[:, None], x, -jnp.inf)
  lengths = jnp.arange(1, l + 1, dtype=jnp.int32)
  full = jnp.full((l,), l, jnp.int32)
  bs = tk.BlockSizes.default_for(l)
  ours = jax.jit(lambda s, n: tk.select_topk(s, n, k=k, block_sizes=bs, interpret=interp))
  ref = jax.jit(lambda s: tref.topk_reference(s, k))
  got, want = ours(x, lengths), ref(x)
  rows = np.r_[0:32, l - 64 : l]
  g, w_ = np.asarray(got)[rows], np.asarray(want)[rows]
  ok = all(sorted(a[a >= 0].tolist()) == sorted(b[b >= 0].tolist()) for a, b in zip(g, w_))
  g2 = np.asarray(ours(x, full))[rows]
  ok2 = all(sorted(a[a >= 0].tolist()) == sorted(b[b >= 0].tolist()) for a, b in zip(g2, w_))
  iters = 3 if small else 10
  t = bc.time_fn(ours, x, lengths, iters=iters)
  t_full = bc.time_fn(ours, x, full, iters=iters)
  tb = bc.time_fn(ref, x, iters=iters)
  return [
    bc.row(
      "T1",
      {
        "rows": l,
        "cols": l,
        "k": k,
        "causal": True,
        "chunk": bs.chunk,
        "radix_bits": bs.radix_bits,
      },
      t,
      None,
      exact_sets_on_checked_rows=bool(ok and ok2),
      full_scan_time_ms=t_full,
      full_scan_ratio=tb / t_full,
      baseline={"name": "lax.top_k", "time_ms": tb},
    )
  ]


def _mla_impl(small):
  """'pallas' if the sparse-MLA kernel runs fwd+bwd here, else 'reference'."""
  from pallas_kernels.sparse_mla import ops as mla  # noqa: PLC0415

  if _interp(small):
    return "reference"
  try:
    q = _rand(10, (1, 128, 128, 576), jnp.bfloat16)
    kv = _rand(11, (1, 128, 576), jnp.bfloat16)
    idx = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (1, 128, 64))
    f = lambda q, kv: jnp.sum(
      mla.sparse_mla(q, kv, idx, scale=0.1, d_v=512, impl="pallas")[0].astype(jnp.float32)
    )
    jax.block_until_ready(jax.grad(f, (0, 1))(q, kv))
    return "pallas"
  except Exception as e:  # noqa: BLE001 - any failure means: use the reference, and say so
    print("sparse_mla pallas unavailable:", type(e).__name__, str(e)[:200])
    return "reference"


def e1_part_fns(q, kv, qi, ki, wi, do, topk, scale, dv, impl, interp, bt):
  """The E1 layer's parts as {name: (jitted fn, args)}: indexer+top-k, sparse MLA fwd and
  fwd+bwd, probs, sparse KL fwd+bwd (also experiments/profile_e1.py's parts)."""
  from pallas_kernels.sparse_mla import ops as mla  # noqa: PLC0415

  sel = jax.jit(
    lambda qi, ki, wi: li_ops.indexer_topk(
      qi, ki, wi, topk=topk, impl="pallas", interpret=interp, block_t=bt
    )
  )
  idx = sel(qi, ki, wi)
  fwd = jax.jit(lambda q, kv, idx: mla.sparse_mla(q, kv, idx, scale=scale, d_v=dv, impl=impl))
  lse = fwd(q, kv, idx)[1]

  def attn_loss(q, kv, idx, do):
    out = mla.sparse_mla(q, kv, idx, scale=scale, d_v=dv, impl=impl)[0]
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

  probs = jax.jit(
    lambda q, kv, idx, lse: mla.sparse_mla_probs(q, kv, idx, lse, scale=scale, impl=impl)
  )
  p = probs(q, kv, idx, lse)
  kl = jax.jit(
    jax.grad(
      lambda qi, ki, wi, idx, p: jnp.sum(li_ops.sparse_kl(qi, ki, wi, idx, p, impl="pallas")),
      (0, 1, 2),
    )
  )
  return {
    "indexer_topk": (sel, (qi, ki, wi)),
    "sparse_mla_fwd": (fwd, (q, kv, idx)),
    "sparse_mla_fwd_bwd": (jax.jit(jax.grad(attn_loss, (0, 1))), (q, kv, idx, do)),
    "probs": (probs, (q, kv, idx, lse)),
    "sparse_kl_fwd_bwd": (kl, (qi, ki, wi, idx, p)),
  }


def e1_layer_grad(topk, scale, dv, impl, interp, bt):
  """jit(grad) of one DSA layer (indexer + top-k, sparse MLA, probabilities, sparse KL) in
  (q, kv, qi, ki, wi), called as f(q, kv, qi, ki, wi, do). dO is an argument, not a closure: a
  closed-over array becomes a compile-time constant (17 GB at 128K) and compilation alone then
  outlasts a device call."""
  from pallas_kernels.sparse_mla import ops as mla  # noqa: PLC0415

  def layer(q, kv, qi, ki, wi, do):
    idx = li_ops.indexer_topk(qi, ki, wi, topk=topk, impl="pallas", interpret=interp, block_t=bt)
    out, lse = mla.sparse_mla(q, kv, idx, scale=scale, d_v=dv, impl=impl)
    p = mla.sparse_mla_probs(q, kv, idx, lse, scale=scale, impl=impl)
    kl = li_ops.sparse_kl(qi, ki, wi, idx, p, impl="pallas")
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)) + jnp.sum(kl)

  return jax.jit(jax.grad(layer, (0, 1, 2, 3, 4)))


def _e1_parts(*args):
  """Each part of the E1 layer alone (ms), to show where the time goes. The parts overlap the
  whole only roughly: XLA schedules them together in the full layer."""
  timed = e1_part_fns(*args)
  return {name: bc.time_fn(f, *a, warmup=1, iters=3) for name, (f, a) in timed.items()}


def e1_inputs(l, small=False, indexer_dtype=jnp.bfloat16):
  """E1's layer inputs at length l: q, kv, indexer q/k/w, dO. The indexer q and k come in the
  dtype the model hands the indexer ops (bf16: the compute dtype; the FP8 rounding keeps it),
  w in f32 (weights_proj is f32)."""
  h, dqk, dv = (8, 576, 512) if small else (128, 576, 512)
  return (
    _rand(20, (1, l, h, dqk), jnp.bfloat16),
    _rand(21, (1, l, dqk), jnp.bfloat16),
    _rand(22, (1, l, 64, 128), indexer_dtype),
    _rand(23, (1, l, 128), indexer_dtype),
    _rand(24, (1, l, 64), scale=1 / np.sqrt(64 * 128)),
    _rand(25, (1, l, h, dv), jnp.bfloat16),
  )


def suite_e1(small: bool):
  from pallas_kernels.sparse_mla import ops as mla  # noqa: PLC0415

  env = os.environ.get("E1_LENGTHS")  # e.g. "32768,65536" to resume within one device call
  ls = (
    [256]
    if small
    else [int(x) for x in env.split(",")]
    if env
    else [8192, 16384, 32768, 65536, 131072]
  )
  h, dqk, dv, topk = (8, 576, 512, 64) if small else (128, 576, 512, 2048)
  hd, dqk_mha = (8, 64) if small else (128, 192)
  # E1_PROBS=kernel|reference: the head-mean probabilities (sparse KL target) on the Pallas-Triton
  # kernel or the reference (default: the ops' setting, GPU_PROBS_KERNEL).
  mode = os.environ.get("E1_PROBS", "")
  if mode not in ("", "kernel", "reference"):
    raise ValueError(f"E1_PROBS={mode!r}; expected kernel or reference")
  if mode:
    mla.GPU_PROBS_KERNEL = mode == "kernel"
  kl_mode = os.environ.get("E1_SPARSE_KL", "")
  if kl_mode not in ("", "kernels", "xla"):
    raise ValueError(f"E1_SPARSE_KL={kl_mode!r}; expected kernels or xla")
  if kl_mode:
    li_ops.SPARSE_KL_KERNELS_BY_DEFAULT = kl_mode != "xla"
  impl = _mla_impl(small)
  interp = _interp(small)
  want_parts = small or bool(os.environ.get("E1_PARTS"))  # E1_PARTS=1: per-part times too
  rows = []
  scale = 0.1352
  for l in ls:
    t_start = time.time()
    try:
      q, kv, qi, ki, wi, do = e1_inputs(l, small)
      bt = min(l, 4096)

      ours = e1_layer_grad(topk, scale, dv, impl, interp, bt)
      t = bc.time_fn(ours, q, kv, qi, ki, wi, do, warmup=1, iters=3)
      parts = (
        _e1_parts(q, kv, qi, ki, wi, do, topk, scale, dv, impl, interp, bt) if want_parts else None
      )
      del q, kv
      qm = _rand(26, (1, l, hd, dqk_mha), jnp.bfloat16)
      km = _rand(27, (1, l, hd, dqk_mha), jnp.bfloat16)
      vm = _rand(28, (1, l, hd, dqk_mha), jnp.bfloat16)
      dom = _rand(29, (1, l, hd, dqk_mha), jnp.bfloat16)
      dense_impl = None if interp else "cudnn"
      dense = jax.jit(
        jax.grad(
          lambda q, k, v, dom: jnp.sum(
            jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=dense_impl).astype(
              jnp.float32
            )
            * dom
          ),
          (0, 1, 2),
        )
      )
      td = bc.time_fn(dense, qm, km, vm, dom, warmup=1, iters=3)
      del qm, km, vm
      rows.append(
        bc.row(
          "E1",
          {"seq_len": l, "h": h, "d_qk": dqk, "d_v": dv, "topk": topk, "H_I": 64, "d_I": 128},
          t,
          None,
          sparse_mla_impl=impl,
          probs="kernel" if mla.GPU_PROBS_KERNEL else "reference",
          sparse_kl="xla" if li_ops.sparse_kl_kernels_why(qi, ki) else "kernels",
          indexer_dtype=str(qi.dtype),
          **({"parts_ms": parts} if parts else {}),
          baseline={"name": "cudnn_mha_h128_dqk192_vpad192_fwd_bwd", "time_ms": td},
        )
      )
      print(json.dumps(rows[-1]), flush=True)
    except Exception as e:  # noqa: BLE001 - record how far it fits, then stop
      rows.append(
        bc.row(
          "E1",
          {"seq_len": l},
          float("nan"),
          None,
          sparse_mla_impl=impl,
          error=f"{type(e).__name__}: {str(e)[:300]}",
        )
      )
      break
    if time.time() - t_start > 240:
      break  # the next length would not fit in one device call
  return rows


SUITES = {"I1": suite_i1, "T1": suite_t1, "E1": suite_e1}
