# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""DeepSeek-V4 benchmarks (issue 22, item 7): E1_V4, one V4-Flash CSA layer's attention fwd+bwd.

Conventions: docs/benchmarks.md.

  python -m experiments.bench --suite=E1_V4 --out=experiments/results/e1_v4.json
  E1_V4_LENGTHS=65536,131072 python -m experiments.bench --suite=E1_V4   # resume at a length
  E1_V4_EQUAL_WORK=0 skips the equal-work row (below).

E1_V4 rows (`variant` "layer"), one per length L (8K ... 128K):
  ours: compressed indexer top-k (v4_attention.ops.compressed_topk, impl="pallas": FP8 logits +
  select with lengths (t+1)//4, k 512) -> window 128 + the selected entries with the per-head sink
  (v4_attention impl="pallas": the sparse-attention kernel over one 640-slot index buffer, H 64,
  K = V 512, bf16) -> the sparse indexer KL (`indexer_kl` with idx: the sparse-KL Pallas-Triton
  kernels where lightning_indexer.ops.SPARSE_KL_KERNELS_BY_DEFAULT lets them run, else its
  reference; E1_V4_SPARSE_KL=kernels|reference overrides; `indexer_kl_impl` in the row), fwd+bwd
  (grads to q, rows, entries, sink, indexer q/k/w).
  The compressor and projections are not timed (they are the same dense GEMMs either way).
  baseline: dense causal attention over the same L tokens, fwd+bwd, cuDNN
  (`jax.nn.dot_product_attention(implementation="cudnn")`) in V4's MQA form (64 query heads, one
  shared K = V row of width 512). cuDNN's fused attention may not take head dim 512; then the
  next candidate that runs is used (d 256, same heads) and `baseline.name` says which and why
  (`baseline.note`). With E1_V4_PARTS=1 (and --small) `parts_ms` has each part alone.
E1_V4 row `variant` "v4_vs_v32_equal_work" (at the first length): the V4 sparse attention fwd+bwd
  (as above, without the indexer) vs the V3.2 sparse-MLA kernel fwd+bwd at its own shape (h 128,
  d_qk 576, d_v 512, top-2048) with s_q chosen so both do the same FLOPs (docs/benchmarks.md
  §FLOP conventions): ratio > 1 means V4's shape runs the kernel faster per FLOP.
  `same_buffer_no_sink_ms` is the kernel alone on V4's buffer (no sink, no buffer build): the
  difference to time_ms is the V4 wrapper's cost.
--small: tiny shapes in the GPU / Triton interpreters on CPU (a smoke test of the harness).
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from pallas_kernels.lightning_indexer import ops as li_ops
from pallas_kernels.sparse_mla import ops as mla
from pallas_kernels.v4_attention import ops as v4_ops

RATIO, WINDOW = 4, 128


def _rand(seed, shape, dtype=jnp.float32, scale=1.0):
  return (scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def _interp(small):
  return small and jax.default_backend() == "cpu"


def _shapes(small):
  """h, K, window, topk, indexer J, D (the indexer kernels need J 64, D 128 even when small)."""
  if small:
    return dict(h=8, k=128, window=8, topk=4, j=64, d=128)
  return dict(h=64, k=512, window=WINDOW, topk=512, j=64, d=128)


def _sparse_flops(s_q, h, slots, d_qk, d_v):
  """fwd + bwd FLOPs of sparse attention over `slots` rows a query (docs/benchmarks.md)."""
  return 2.0 * s_q * h * slots * (d_qk + d_v) + 2.0 * s_q * h * slots * (3 * d_qk + 2 * d_v)


def _dense_baseline(l, h, small, iters):
  """(name, time_ms, note) of dense causal MQA attention fwd+bwd over l tokens."""
  interp = _interp(small)
  cands = [(512, None)] if interp else [(512, "cudnn"), (256, "cudnn")]
  if small:
    cands = [(128, None if interp else "cudnn")]
  notes = []
  for d, impl in cands:
    try:
      q = _rand(30, (1, l, h, d), jnp.bfloat16)
      kv = _rand(31, (1, l, 1, d), jnp.bfloat16)
      do = _rand(32, (1, l, h, d), jnp.bfloat16)

      def loss(q, kv, do, impl=impl):
        o = jax.nn.dot_product_attention(q, kv, kv, is_causal=True, implementation=impl)
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

      f = jax.jit(jax.grad(loss, (0, 1)))
      t = bc.time_fn(f, q, kv, do, warmup=1, iters=iters)
      name = f"{impl or 'xla'}_causal_mqa_h{h}_d{d}_fwd_bwd"
      return name, t, "; ".join(notes) or None
    except Exception as e:  # noqa: BLE001 - try the next candidate, and say why
      notes.append(f"d={d} {impl}: {type(e).__name__}: {str(e)[:160]}")
  return "none", None, "; ".join(notes)


def _inputs(l, s):
  u = l // RATIO
  return dict(
    q=_rand(20, (1, l, s["h"], s["k"]), jnp.bfloat16),
    kv=_rand(21, (1, l, s["k"]), jnp.bfloat16),
    ckv=_rand(22, (1, u, s["k"]), jnp.bfloat16),
    sink=_rand(23, (s["h"],), scale=0.5),
    qi=_rand(24, (1, l, s["j"], s["d"])),
    ki=_rand(25, (1, u, s["d"])),
    wi=_rand(26, (1, l, s["j"]), scale=1 / np.sqrt(s["j"] * s["d"])),
    do=_rand(27, (1, l, s["h"], s["k"]), jnp.bfloat16),
  )


def _layer_fns(s, interp, bt, scale):
  def select(qi, ki, wi):
    return v4_ops.compressed_topk(
      qi, ki, wi, ratio=RATIO, topk=s["topk"], block_t=bt, impl="pallas", interpret=interp
    )

  def attend(q, kv, ckv, sink, idx):
    return v4_ops.v4_attention(
      q,
      kv,
      sink,
      scale=scale,
      window=s["window"],
      ckv=ckv,
      ratio=RATIO,
      idx=idx,
      impl="pallas",
      interpret=interp,
    )

  def attn_loss(q, kv, ckv, sink, idx, do):
    out = attend(q, kv, ckv, sink, idx)[0]
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

  # do is an argument, not a closure: a closed-over array becomes a compile-time constant.
  def layer(q, kv, ckv, sink, qi, ki, wi, do):
    idx = select(qi, ki, wi)
    out, lse = attend(q, kv, ckv, sink, idx)
    kl = v4_ops.indexer_kl(
      qi, ki, wi, q, ckv, lse, ratio=RATIO, scale=scale, idx=idx, impl="pallas", block_t=bt
    )
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)) + jnp.sum(kl)

  return select, attend, attn_loss, layer


def _parts(x, s, interp, bt, scale, iters):
  select, attend, attn_loss, _ = _layer_fns(s, interp, bt, scale)
  sel = jax.jit(select)
  idx = sel(x["qi"], x["ki"], x["wi"])
  attn = jax.jit(jax.grad(attn_loss, (0, 1, 2, 3)))
  a = (x["q"], x["kv"], x["ckv"], x["sink"], idx, x["do"])

  def kl_loss(qi, ki, wi, q, ckv, sink, idx, kv):
    lse = attend(q, kv, ckv, sink, idx)[1]
    kl = v4_ops.indexer_kl(
      qi, ki, wi, q, ckv, lse, ratio=RATIO, scale=scale, idx=idx, impl="pallas", block_t=bt
    )
    return jnp.sum(kl)

  kl = jax.jit(jax.grad(kl_loss, (0, 1, 2)))
  ka = (x["qi"], x["ki"], x["wi"], x["q"], x["ckv"], x["sink"], idx, x["kv"])
  timed = {
    "compressed_topk": (sel, (x["qi"], x["ki"], x["wi"])),
    "v4_attention_fwd_bwd": (attn, a),
    "sparse_indexer_kl_fwd_bwd_incl_attention_fwd": (kl, ka),
  }
  return {n: bc.time_fn(f, *args, warmup=1, iters=iters) for n, (f, args) in timed.items()}


def _equal_work_row(l, s, small, scale, iters):
  """V4 sparse attention fwd+bwd vs the V3.2 sparse-MLA kernel at the same FLOPs."""
  interp = _interp(small)
  x = _inputs(l, s)
  u = l // RATIO
  rng = np.random.default_rng(0)
  # a full selection of visible entries per query (-1 where fewer are visible), like the top-k's
  n_vis = (np.arange(l) + 1) // RATIO
  ids = rng.integers(0, np.maximum(n_vis, 1)[:, None], (l, s["topk"]))
  idx = jnp.asarray(np.where(np.arange(s["topk"])[None] < n_vis[:, None], ids, -1)[None], jnp.int32)
  _, _, attn_loss, _ = _layer_fns(s, interp, l, scale)
  ours = jax.jit(jax.grad(attn_loss, (0, 1, 2, 3)))
  t = bc.time_fn(ours, x["q"], x["kv"], x["ckv"], x["sink"], idx, x["do"], warmup=1, iters=iters)
  w = min(s["window"], l)
  slots = w + s["topk"]
  flops = _sparse_flops(l, s["h"], slots, s["k"], s["k"])

  # The kernel alone on V4's buffer: no sink, no buffer build, no row concatenation in the timing.
  buf = v4_ops.v4_index_buffer(l, s["window"], u=u, ratio=RATIO, idx=idx)
  rows = jnp.concatenate([x["kv"], x["ckv"]], axis=1)
  kern_kw = dict(scale=scale, d_v=s["k"], impl="pallas", interpret=interp)

  def plain(q, rows, buf, do):
    o = mla.sparse_mla(q, rows, buf, **kern_kw)[0]
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

  t_plain = bc.time_fn(
    jax.jit(jax.grad(plain, (0, 1))), x["q"], rows, buf, x["do"], warmup=1, iters=iters
  )
  del x, rows, buf

  # V3.2's shape at the same FLOPs (s_q a multiple of 64, keys = the same L)
  h3, dqk, dv, k3 = (8, 192, 128, 8) if small else (128, 576, 512, 2048)
  per_q = _sparse_flops(1, h3, k3, dqk, dv)
  s_q = max(64, int(round(flops / per_q / 64)) * 64)
  q3 = _rand(40, (1, s_q, h3, dqk), jnp.bfloat16)
  kv3 = _rand(41, (1, l, dqk), jnp.bfloat16)
  do3 = _rand(42, (1, s_q, h3, dv), jnp.bfloat16)
  idx3 = jnp.asarray(rng.integers(0, l, (1, s_q, k3)), jnp.int32)

  def v32(q, kv, do):
    o = mla.sparse_mla(q, kv, idx3, scale=scale, d_v=dv, impl="pallas", interpret=interp)[0]
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

  tb = bc.time_fn(jax.jit(jax.grad(v32, (0, 1))), q3, kv3, do3, warmup=1, iters=iters)
  fb = _sparse_flops(s_q, h3, k3, dqk, dv)
  return bc.row(
    "E1_V4",
    {"seq_len": l, "h": s["h"], "k": s["k"], "window": s["window"], "topk": s["topk"]},
    t,
    flops,
    variant="v4_vs_v32_equal_work",
    same_buffer_no_sink_ms=t_plain,
    flops_convention="sparse fwd+bwd, every slot counts (docs/benchmarks.md)",
    baseline={
      "name": f"v32_sparse_mla_pallas_h{h3}_dqk{dqk}_dv{dv}_top{k3}_sq{s_q}_skv{l}_fwd_bwd",
      # scaled to V4's FLOPs (s_q is rounded to 64): the ratio compares equal work
      "time_ms": tb * flops / fb,
      "measured_ms": tb,
      "tflops": fb / (tb * 1e-3) / 1e12,
    },
  )


def suite_e1_v4(small: bool):
  env = os.environ.get("E1_V4_LENGTHS")
  ls = (
    [64]
    if small
    else [int(x) for x in env.split(",")]
    if env
    else [8192, 16384, 32768, 65536, 131072]
  )
  s = _shapes(small)
  scale = s["k"] ** -0.5
  interp = _interp(small)
  iters = 1 if small else 3
  want_parts = small or bool(os.environ.get("E1_V4_PARTS"))
  kl_mode = os.environ.get("E1_V4_SPARSE_KL", "")
  if kl_mode not in ("", "kernels", "reference"):
    raise ValueError(f"E1_V4_SPARSE_KL={kl_mode!r}; expected kernels or reference")
  if kl_mode:
    li_ops.SPARSE_KL_KERNELS_BY_DEFAULT = kl_mode == "kernels"
  rows = []
  for l in ls:
    t_start = time.time()
    try:
      x = _inputs(l, s)
      bt = min(l, 2048)
      why = li_ops.sparse_kl_kernels_why(x["qi"], x["ki"])
      kl_impl = "reference" if why else "kernels (kernel_sparse_kl_triton)"
      _, _, _, layer = _layer_fns(s, interp, bt, scale)
      ours = jax.jit(jax.grad(layer, (0, 1, 2, 3, 4, 5, 6)))
      args = [x[n] for n in ("q", "kv", "ckv", "sink", "qi", "ki", "wi", "do")]
      t = bc.time_fn(ours, *args, warmup=1, iters=iters)
      slots = min(s["window"], l) + s["topk"]
      parts = _parts(x, s, interp, bt, scale, iters) if want_parts else None
      del x, args
      name, td, note = _dense_baseline(l, s["h"], small, iters)
      base = {"name": name, "time_ms": td}
      if note:
        base["note"] = note
      rows.append(
        bc.row(
          "E1_V4",
          {
            "seq_len": l,
            "h": s["h"],
            "k": s["k"],
            "window": s["window"],
            "ratio": RATIO,
            "topk": s["topk"],
            "H_I": s["j"],
            "d_I": s["d"],
          },
          t,
          _sparse_flops(l, s["h"], slots, s["k"], s["k"]),
          variant="layer",
          topk_impl="pallas",
          attention_impl="pallas",
          indexer_kl_impl=kl_impl,
          flops_convention="tflops counts the sparse attention fwd+bwd only",
          **({"parts_ms": parts} if parts else {}),
          baseline=base,
        )
      )
      print(json.dumps(rows[-1]), flush=True)
    except Exception as e:  # noqa: BLE001 - record how far it fits, then stop
      rows.append(
        bc.row("E1_V4", {"seq_len": l}, float("nan"), None, error=f"{type(e).__name__}: {e!s:.300}")
      )
      break
    if time.time() - t_start > 240:
      break  # the next length would not fit in one device call
  if os.environ.get("E1_V4_EQUAL_WORK", "1") == "0":
    return rows
  try:
    rows.append(_equal_work_row(ls[0], s, small, scale, iters))
  except Exception as e:  # noqa: BLE001 - keep the layer rows
    rows.append(
      bc.row(
        "E1_V4",
        {"seq_len": ls[0]},
        float("nan"),
        None,
        variant="v4_vs_v32_equal_work",
        error=f"{type(e).__name__}: {e!s:.300}",
      )
    )
  return rows


SUITES = {"E1_V4": suite_e1_v4}
