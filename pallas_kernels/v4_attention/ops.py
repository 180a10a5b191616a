# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Public DeepSeek-V4 attention ops: shape checks and the impl switch ("reference" | "pallas").

impl="pallas" runs V4's attention (`sink_attention`, `v4_attention`) on the V3.2 sparse-attention
kernels (pallas_kernels/sparse_mla/ops.py, backend "gpu" or "tpu") and folds the sink in XLA:

- V4 rows are K wide with key = value, so the kernel runs with d_v = K and returns, per query and
  head, out and lse over the selected rows only (lse = +inf, out = 0 where no slot is valid).
- The sink a_h adds exp(a_h) to the denominator and nothing to the numerator, so the
  sink-inclusive results are exactly lse' = log(exp(lse) + exp(a_h)) and out' = out·exp(lse − lse')
  (`fold_sink`). JAX differentiates this epilogue: d q and d rows through the kernel's custom VJP
  (which takes both the out and the lse cotangent), d sink directly.
- `v4_attention` gathers window ∪ compressed rows through one index buffer (`v4_index_buffer`) over
  the row buffer [raw rows ; compressed entries], so one kernel call serves both sets.

`indexer_kl`'s warm-up (every visible entry) runs on the dense-KL Pallas-Triton kernels with the
block-causal rule (ratio m); its sparse stage builds the teacher at the selected entries in XLA
and runs the V3.2 sparse-KL kernels (lightning_indexer/kernel_sparse_kl_triton.py) over the
compressed keys, where they run. `compressed_topk` and `compressed_indexer_logits` run on the
V3.2 GPU indexer kernels (Mosaic GPU FP8 logits with a ratio-m causal bound, the Triton select
with per-row lengths (t+1)//m) where they take the shape (J 64, D 128, backend "gpu"), else their
references.
"""

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels.lightning_indexer import kernel_kl_triton, kernel_sparse_kl_triton
from pallas_kernels.lightning_indexer import ops as lightning_indexer_ops
from pallas_kernels.sparse_mla import ops as sparse_mla_ops
from pallas_kernels.v4_attention import reference

IMPLS = ("reference", "pallas")


def _impl(impl: str):
  if impl not in IMPLS:
    raise ValueError(f"V4 attention impl={impl!r}; expected one of {IMPLS}")


def fold_sink(out, lse, sink):
  """Adds the per-head sink to a softmax given as (out, lse) over its keys.

  out [B,T,H,K] (any float dtype), lse [B,T,H] f32 (+inf: the row had no key, out = 0 there),
  sink [H] -> out' [B,T,H,K] (out.dtype), lse' [B,T,H] f32 with
  lse' = log(exp(lse) + exp(a_h)), out' = out·exp(lse − lse'). A row with no key gets lse' = a_h,
  out' = 0 (lse' = +inf if the sink is −inf too, the references' convention). No inf − inf is
  ever formed, so values and gradients stay finite for any finite sink.
  """
  a = jnp.broadcast_to(sink.astype(jnp.float32)[None, None, :], lse.shape)
  lse = lse.astype(jnp.float32)
  l = jnp.where(lse == jnp.inf, -jnp.inf, lse)  # a row with no key contributes exp(-inf) = 0
  m = jnp.maximum(l, a)
  # The shift cancels exactly in value and gradient, so it needs no gradient of its own.
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  den = jnp.exp(l - m) + jnp.exp(a - m)
  empty = den == 0  # no key and a -inf sink
  lse_new = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, den)))
  # exp(lse - lse') = exp(l - m) / den: never inf - inf (l and m are -inf only where den is 0).
  w = jnp.exp(l - m) / jnp.where(empty, 1.0, den)
  out_new = (out.astype(jnp.float32) * w[..., None]).astype(out.dtype)
  return out_new, lse_new


def _kernel_sink_attention(q, kv, idx, sink, scale, interpret, backend, config):
  out, lse = sparse_mla_ops.sparse_mla(
    q,
    kv,
    idx,
    scale=scale,
    d_v=kv.shape[-1],
    impl="pallas",
    interpret=interpret,
    backend=backend,
    config=config,
  )
  return fold_sink(out, lse, sink)


def sink_attention(
  q,
  kv,
  idx,
  sink,
  *,
  scale,
  block_t=512,
  impl="reference",
  interpret=False,
  backend=None,
  config=None,
):
  """out [B,T,H,K], lse [B,T,H] over an explicit index buffer with the sink (reference.py).

  q [B,T,H,K], kv [B,S,K] (K = V), idx [B,T,k] int (<0 or >=S: no key; duplicates count twice),
  sink [H]. impl="pallas": the sparse-attention kernel with d_v = K plus `fold_sink`;
  interpret / backend / config as for `sparse_mla_ops.sparse_mla` (GPU: q, kv bf16 or f16;
  TPU: both bf16 or both f32). block_t is the reference's query chunk only.
  """
  _impl(impl)
  if q.ndim != 4 or kv.ndim != 3 or idx.ndim != 3 or q.shape[-1] != kv.shape[-1]:
    raise ValueError(
      f"expected q [B,T,H,K], kv [B,S,K], idx [B,T,k]; got {q.shape}, {kv.shape}, {idx.shape}"
    )
  if sink.shape != (q.shape[2],):
    raise ValueError(f"sink must be [H={q.shape[2]}], got {sink.shape}")
  if impl == "reference":
    return reference.sink_attention(q, kv, idx, sink, scale=scale, block_t=block_t)
  return _kernel_sink_attention(q, kv, idx, sink, scale, interpret, backend, config)


def v4_index_buffer(t: int, window: int, *, u: int = 0, ratio: int = 0, idx=None, batch: int = 1):
  """One index buffer [B,T,n] int32 over the row buffer [raw rows (T) ; compressed entries (U)].

  Slots of query t, in order:
    0 .. W'-1   window rows t−W'+1 .. t, oldest first (W' = min(window, T); −1 before row 0);
    W' ..       compressed entries as T + j: idx given (CSA sparse), slot i holds T + idx[t, i]
                if 0 <= idx[t, i] < min((t+1)//m, U), else −1 (n = W' + k); idx None (HCA, CSA
                dense), slot W' + j holds T + j for every visible j < (t+1)//m, else −1
                (n = W' + U).
  Duplicate ids in idx stay duplicates (counted twice, as in the reference). A window longer
  than T only adds slots that are always −1, hence W' = min(window, T).
  """
  w = min(window, t)
  if u and idx is None:
    return jnp.broadcast_to(_visible_block(jnp.arange(t), t, w, u, ratio)[None], (batch, t, w + u))
  win = jnp.broadcast_to(reference.window_indices(t, w)[None], (batch, t, w))
  if u == 0:
    return win
  n_vis = reference.visible_entries(jnp.arange(t, dtype=jnp.int32), ratio)[None, :, None]
  idx = idx.astype(jnp.int32)
  comp = jnp.where((idx >= 0) & (idx < jnp.minimum(n_vis, u)), t + idx, -1)
  return jnp.concatenate([win, comp.astype(jnp.int32)], axis=-1)


# An all-visible index buffer (idx None) over this many int32 slots or more (CSA's dense stage:
# T·(W + T/4), 4.3 GB at T = 64K) is built one query block at a time instead (_visible_blocks).
VISIBLE_BUFFER_LIMIT = 1 << 26


def _visible_block(pos, t: int, window: int, u: int, ratio: int):
  """v4_index_buffer's slots with idx None for query positions pos [n] (>= t: padding, all -1)."""
  live = (pos < t)[:, None]
  win = pos[:, None] - (window - 1) + jnp.arange(window, dtype=jnp.int32)[None, :]
  win = jnp.where((win >= 0) & live, win, -1)
  j = jnp.arange(u, dtype=jnp.int32)[None, :]
  comp = jnp.where((j < reference.visible_entries(pos, ratio)[:, None]) & live, t + j, -1)
  return jnp.concatenate([win, comp], axis=-1).astype(jnp.int32)


def _visible_blocks(q, rows, sink, scale, window, u, ratio, block_t, interpret, backend, config):
  """The all-visible attention one block of block_t queries at a time (lax.map). Each block's
  index buffer [B, block_t, W' + U] is made inside a jax.checkpoint that keeps the kernel's
  outputs (named SAVED, SAVED_OUT), so the backward rebuilds the buffer (iota arithmetic) rather than
  keeping all of them: never a [T, W' + U] array. The interpreter's callbacks are effects,
  which AD of jax.checkpoint does not take: there the blocks run without it (same values)."""
  b, t, h, k = q.shape
  w = min(window, t)
  bt = min(block_t, t)
  n = -(-t // bt)
  qs = jnp.moveaxis(_common.pad_axis(q, 1, bt).reshape(b, n, bt, h, k), 1, 0)
  # Every block adds to the rows' gradient: an f32 operand keeps that sum in f32 (bf16 partial
  # sums would round once per block).
  rows32 = rows.astype(jnp.float32)

  def one(qb, t0):
    buf = _visible_block(t0 + jnp.arange(bt, dtype=jnp.int32), t, w, u, ratio)
    buf = jnp.broadcast_to(buf[None], (b,) + buf.shape)
    r = rows32.astype(rows.dtype)
    return _kernel_sink_attention(qb, r, buf, sink, scale, interpret, backend, config)

  if not interpret:
    policy = jax.checkpoint_policies.save_only_these_names(_common.SAVED, _common.SAVED_OUT)
    one = jax.checkpoint(one, policy=policy)
  out, lse = jax.lax.map(lambda a: one(*a), (qs, jnp.arange(n, dtype=jnp.int32) * bt))
  out = jnp.moveaxis(out, 0, 1).reshape((b, n * bt) + out.shape[3:])[:, :t]
  return out, jnp.moveaxis(lse, 0, 1).reshape(b, n * bt, h)[:, :t]


def v4_attention(
  q,
  kv,
  sink,
  *,
  scale,
  window,
  ckv=None,
  ratio=0,
  idx=None,
  block_t=512,
  impl="reference",
  interpret=False,
  backend=None,
  config=None,
):
  """out [B,T,H,K], lse [B,T,H] over window ∪ compressed rows with the sink (reference.py).

  impl="pallas": one kernel call over [kv ; ckv] with the slots of `v4_index_buffer` (window,
  then the selected entries, or every visible entry when idx is None), then `fold_sink`.
  The all-visible case (HCA, CSA's dense stage) gives every query W + U slots; when that
  buffer would reach VISIBLE_BUFFER_LIMIT slots it is built and attended per query block of
  block_t (`_visible_blocks`), so CSA's dense stage holds no [T, T/4] array.
  """
  _impl(impl)
  if q.ndim != 4 or kv.ndim != 3 or q.shape[-1] != kv.shape[-1]:
    raise ValueError(f"q must be [B,T,H,K] and kv [B,T,K], got {q.shape}, {kv.shape}")
  if sink.shape != (q.shape[2],):
    raise ValueError(f"sink must be [H={q.shape[2]}], got {sink.shape}")
  if ckv is not None and (ckv.ndim != 3 or ckv.shape[-1] != q.shape[-1]):
    raise ValueError(f"ckv must be [B,U,K={q.shape[-1]}], got {ckv.shape}")
  if idx is not None and (idx.ndim != 3 or idx.shape[:2] != q.shape[:2]):
    raise ValueError(f"idx must be [B,T,k] with B,T of q {q.shape[:2]}, got {idx.shape}")
  if impl == "reference":
    return reference.v4_attention(
      q, kv, sink, scale=scale, window=window, ckv=ckv, ratio=ratio, idx=idx, block_t=block_t
    )
  b, t = q.shape[:2]
  if kv.shape[:2] != (b, t):
    raise ValueError(f"v4_attention wants the raw rows of the T={t} queries, got {kv.shape}")
  if window <= 0:
    raise ValueError(f"window={window} must be > 0")
  if ckv is not None and ratio <= 0:
    raise ValueError(f"compressed rows need a ratio > 0, got {ratio}")
  u = 0 if ckv is None else ckv.shape[1]
  rows = kv if u == 0 else jnp.concatenate([kv, ckv.astype(kv.dtype)], axis=1)
  if idx is None and u > 0 and b * t * (min(window, t) + u) >= VISIBLE_BUFFER_LIMIT:
    args = (sink, scale, window, u, ratio, block_t, interpret, backend, config)
    return _visible_blocks(q, rows, *args)
  buf = v4_index_buffer(t, window, u=u, ratio=ratio, idx=idx, batch=b)
  return _kernel_sink_attention(q, rows, buf, sink, scale, interpret, backend, config)


def _indexer_kernels(q, k, w, ratio, backend, interpret, what, tpu=False) -> bool:
  """Whether the V3.2 GPU indexer kernels (or, with tpu=True on a TPU backend, the TPU ones)
  take a compressed-key call (see compressed_topk)."""
  if q.ndim != 4 or k.ndim != 3 or w.shape != q.shape[:3] or k.shape[-1] != q.shape[-1]:
    raise ValueError(
      f"expected q [B,T,J,D], k [B,U,D], w [B,T,J]; got {q.shape}, {k.shape}, {w.shape}"
    )
  if ratio < 1:
    raise ValueError(f"ratio={ratio} must be >= 1")
  from pallas_kernels.lightning_indexer import kernel_mosaic_gpu  # noqa: PLC0415

  backend = backend or ("tpu" if jax.default_backend() == "tpu" else "gpu")
  why = None
  if backend == "tpu" and tpu:
    if q.shape[2] % 8:
      why = f"J={q.shape[2]} (the TPU logits kernel takes a multiple of 8 indexer heads)"
  elif backend != "gpu":
    why = f"backend={backend!r} (the V4 indexer kernels here are the GPU ones)"
  elif q.shape[2:] != (kernel_mosaic_gpu.HEADS, kernel_mosaic_gpu.DIM):
    why = f"J, D = {q.shape[2:]}; the FP8 kernel takes ({kernel_mosaic_gpu.HEADS}, {kernel_mosaic_gpu.DIM})"
  if why is not None and interpret:
    raise ValueError(f"{what} kernels requested (interpret) but not taken: {why}")
  return why is None


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def compressed_topk(
  q, k, w, *, ratio, topk, block_t=512, impl="reference", interpret=False, backend=None
):
  """Block-causal top-k over compressed indexer keys: idx [B,T,topk] int32, -1 padded.

  q [B,T,J,D] (queries = tokens 0..T-1), k [B,U,D] (compressed keys), w [B,T,J]. Query t takes
  min(topk, (t+1)//m) entries among j < (t+1)//m (never a partial block), ties to the lower id.
  impl="reference": slots in descending score order (reference.compressed_indexer_topk).
  impl="pallas": the V3.2 GPU kernels per query block (topk.kernel_triton.indexer_topk_blocked
  with ratio=m: the Mosaic GPU FP8 logits kernel, non-causal over the block's key bucket, then
  the threshold select with per-row lengths (t+1)//m). The same index set as the reference, slots
  in ascending entry order, -1 last (the V3.2 pallas convention). q and k are re-quantised to
  1x128 e4m3 inside, exact for FP8 fake-quantised inputs (docs/dsa.md §Indexer). Any T and U
  (padded to the kernels' tiles inside); block_t is rounded up to a multiple of 16.
  interpret=True runs the kernels on CPU. Shapes the FP8 kernel does not take (J != 64 or
  D != 128) run the reference, unless interpret asks for the kernels (raises).
  backend="tpu" (or a TPU default backend): the TPU logits kernel with the same block-causal
  bound per query block, then the TPU top-k (lightning_indexer.kernel_tpu.indexer_topk_tpu with
  ratio=m; the TPU generation's matmul numerics, FP8 in the interpreter): slots in descending
  score order, as the reference.
  """
  _impl(impl)
  if topk <= 0:
    raise ValueError(f"topk={topk} must be positive")
  b, t = q.shape[:2]
  if impl == "reference" or not _indexer_kernels(
    q, k, w, ratio, backend, interpret, "compressed_topk", tpu=True
  ):
    return reference.compressed_indexer_topk(q, k, w, ratio=ratio, topk=topk, block_t=block_t)
  u = k.shape[1]
  if u == 0 or t < ratio:  # nothing is visible yet
    return jnp.full((b, t, topk), -1, jnp.int32)
  if (backend or jax.default_backend()) == "tpu":
    from pallas_kernels.lightning_indexer import kernel_tpu  # noqa: PLC0415

    q, k, w = jax.lax.stop_gradient((q, k, w))
    return kernel_tpu.indexer_topk_tpu(
      q,
      k,
      w,
      topk=topk,
      block_t=_round_up(min(block_t, t), 8),
      numerics=kernel_tpu.default_numerics() if not interpret else "fp8",
      interpret=bool(interpret),
      ratio=ratio,
    )
  from pallas_kernels.lightning_indexer import kernel_mosaic_gpu  # noqa: PLC0415
  from pallas_kernels.topk import kernel_triton as topk_kernel  # noqa: PLC0415

  bt = lightning_indexer_ops.gpu_topk_block(t, _round_up(u, 128), b, block_t)
  lbs = kernel_mosaic_gpu.BlockSizes.default_for(bt, _round_up(u, 128))
  q, k, w = jax.lax.stop_gradient((q, k, w))  # indices carry no gradient; kernels have no VJP
  return topk_kernel.indexer_topk_blocked(
    q,
    k,
    w,
    topk=topk,
    block_t=bt,
    logits_block_sizes=lbs,
    interpret=bool(interpret),
    ratio=ratio,
  )


def indexer_kl(
  iq,
  ik,
  iw,
  q,
  ckv,
  lse,
  *,
  ratio,
  scale,
  idx=None,
  block_t=512,
  impl="reference",
  interpret=False,
  block_sizes=None,
):
  """Per-query indexer KL [B,T] of a CSA layer (reference.v4_indexer_kl); idx None = warm-up.

  Warm-up (idx None) with impl="pallas": the Pallas-Triton dense-KL kernels with the block-causal
  rule over compressed entries (lightning_indexer/kernel_kl_triton.py, ratio m), where they run:
  one GPU with lightning_indexer.ops.DENSE_KL_KERNELS_BY_DEFAULT on, or interpret=True (CPU
  tests); `block_sizes` tunes them. The teacher is the same: the layer's sink-inclusive lse makes
  Σ_h exp(scale·q_h·c_j − lse_h) its compressed mass, which the kernel L1-normalises over the
  visible entries.
  Sparse stage (idx given) with impl="pallas": the teacher at the selected entries in XLA
  (`sparse_target`), then the sparse-KL Pallas-Triton kernels over the compressed keys
  (kernel_sparse_kl_triton.sparse_kl, where lightning_indexer.ops.sparse_kl_kernels_why says they
  run: one GPU with SPARSE_KL_KERNELS_BY_DEFAULT on, or interpret=True). Otherwise the reference."""
  _impl(impl)
  if iq.ndim != 4 or ik.ndim != 3 or iw.shape != iq.shape[:3] or ik.shape[-1] != iq.shape[-1]:
    raise ValueError(
      f"expected iq [B,T,J,D], ik [B,U,D], iw [B,T,J]; got {iq.shape}, {ik.shape}, {iw.shape}"
    )
  if ik.shape[:2] != ckv.shape[:2] or lse.shape != q.shape[:3] or q.shape[:2] != iq.shape[:2]:
    raise ValueError(
      f"ik {ik.shape} / ckv {ckv.shape} must share [B,U]; lse {lse.shape} must be q's "
      f"[B,T,H] {q.shape[:3]}; q and iq must share [B,T]"
    )
  if impl == "pallas" and idx is None and ckv.shape[1] > 0 and _dense_kl_kernels(iq, q, interpret):
    return kernel_kl_triton.dense_kl(
      iq,
      ik,
      iw,
      *jax.lax.stop_gradient((q, ckv, lse.astype(jnp.float32))),
      float(scale),
      block_sizes or kernel_kl_triton.BlockSizes(),
      bool(interpret),
      int(ratio),
    )
  if (
    impl == "pallas"
    and idx is not None
    and ckv.shape[1] > 0
    and lightning_indexer_ops.sparse_kl_kernels_why(iq, ik, interpret=interpret) is None
  ):
    sel, p = sparse_target(q, ckv, lse, idx, ratio=ratio, scale=scale, block_t=block_t)
    # the kernel directly: lightning_indexer.ops.sparse_kl's checks want T <= S raw keys
    bsz = kernel_sparse_kl_triton.BlockSizes()
    return kernel_sparse_kl_triton.sparse_kl(iq, ik, iw, sel, p, bsz, bool(interpret))
  return reference.v4_indexer_kl(
    iq, ik, iw, q, ckv, lse, ratio=ratio, scale=scale, idx=idx, block_t=block_t
  )


def sparse_target(q, ckv, lse, idx, *, ratio, scale, block_t=512):
  """(idx with -1 off the support, p [B,T,k] f32): reference.v4_indexer_kl's sparse-stage
  teacher Σ_h exp(scale·q_h·c_j − lse_h) at the valid selected entries j < (t+1)//m,
  L1-normalised over them (0 on a row without mass); detached. Gathers [B,block_t,k,K] rows per
  query block, as the reference does."""
  q, ckv, lse, idx = jax.lax.stop_gradient((q, ckv, lse, idx))
  b, t = q.shape[:2]
  u = ckv.shape[1]
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))

  def block(qb, lb, pb, ib):
    ok = (ib >= 0) & (ib < jnp.minimum(reference.visible_entries(pb, ratio), u)[..., None])
    safe = jnp.clip(ib, 0, u - 1)[..., None]
    sel = jnp.take_along_axis(ckv[:, None], safe, axis=2)  # [B,t,k,K]
    c = jnp.einsum("bthk,btjk->bthj", qb, sel, preferred_element_type=jnp.float32) * scale
    pt = jnp.where(ok, jnp.sum(jnp.exp(c - lb[..., None]), axis=2), 0.0)
    mass = jnp.sum(pt, axis=-1, keepdims=True)
    return jnp.where(ok, ib, -1).astype(jnp.int32), pt / jnp.where(mass > 0, mass, 1.0)

  return _common.map_query_blocks(
    block, block_t, [q, lse.astype(jnp.float32), pos, idx], remat=False
  )


def _dense_kl_kernels(iq, q, interpret) -> bool:
  """Whether the warm-up KL kernels take this call (see indexer_kl)."""
  if kernel_kl_triton.supported(iq, q) is not None:
    return False
  if interpret:
    return True
  return (
    jax.default_backend() == "gpu"
    and _common.per_device()
    and lightning_indexer_ops.DENSE_KL_KERNELS_BY_DEFAULT
  )


def teacher_recall(q, ckv, lse, idx, *, ratio, scale, block_t=512):
  """(recall, overlap) [B,T] of a CSA selection against its dense teacher (eval metrics)."""
  return reference.v4_teacher_recall(q, ckv, lse, idx, ratio=ratio, scale=scale, block_t=block_t)


def compressed_indexer_logits(q, k, w, ratio, *, impl="reference", interpret=False, backend=None):
  """I [B,T,U] f32 over compressed keys, -inf where j >= (t+1)//m (small shapes / query blocks).

  impl="pallas": the Mosaic GPU FP8 logits kernel with its block-causal bound (ratio=m; T, U
  padded to its tiles inside); the same fallbacks as compressed_topk.
  """
  _impl(impl)
  if impl == "reference" or not _indexer_kernels(
    q, k, w, ratio, backend, interpret, "compressed_indexer_logits"
  ):
    return reference.compressed_indexer_logits(q, k, w, ratio)
  from pallas_kernels.lightning_indexer import kernel_mosaic_gpu as lik  # noqa: PLC0415

  b, t = q.shape[:2]
  u = k.shape[1]
  if u == 0:
    return jnp.zeros((b, t, 0), jnp.float32)
  tp, up = _round_up(t, 16), _round_up(u, 128)
  q, k, w = jax.lax.stop_gradient((q, k, w))
  q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  w = jnp.pad(w, ((0, 0), (0, tp - t), (0, 0)))
  k = jnp.pad(k, ((0, 0), (0, up - u), (0, 0)))
  interp = None
  if interpret:
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

    interp = plgpu.InterpretGPUParams()
  out = lik.logits_fp8(
    *lik.prepare_fp8(q, k, w),
    block_sizes=lik.BlockSizes.default_for(tp, up),
    causal=True,
    q_offset=0,
    ratio=ratio,
    interpret=interp,
  )
  return out[:, :t, :u]
