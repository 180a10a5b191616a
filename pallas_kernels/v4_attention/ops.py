# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Public DeepSeek-V4 attention ops: shape checks and the impl switch.

Only impl="reference" exists so far; the Pallas kernels (512-wide K = V rows, the sink and its
gradient, one index buffer of window + selected rows) are issue 22, item 4.
"""

from pallas_kernels.v4_attention import reference

IMPLS = ("reference",)


def _impl(impl: str):
  if impl not in IMPLS:
    raise ValueError(f"V4 attention impl={impl!r}: only {IMPLS} exist (Pallas kernels: to do)")


def v4_attention(
  q, kv, sink, *, scale, window, ckv=None, ratio=0, idx=None, block_t=512, impl="reference"
):
  """out [B,T,H,K], lse [B,T,H] over window ∪ compressed rows with the sink (reference.py)."""
  _impl(impl)
  if q.ndim != 4 or kv.ndim != 3 or q.shape[-1] != kv.shape[-1]:
    raise ValueError(f"q must be [B,T,H,K] and kv [B,T,K], got {q.shape}, {kv.shape}")
  if sink.shape != (q.shape[2],):
    raise ValueError(f"sink must be [H={q.shape[2]}], got {sink.shape}")
  if ckv is not None and (ckv.ndim != 3 or ckv.shape[-1] != q.shape[-1]):
    raise ValueError(f"ckv must be [B,U,K={q.shape[-1]}], got {ckv.shape}")
  if idx is not None and (idx.ndim != 3 or idx.shape[:2] != q.shape[:2]):
    raise ValueError(f"idx must be [B,T,k] with B,T of q {q.shape[:2]}, got {idx.shape}")
  return reference.v4_attention(
    q, kv, sink, scale=scale, window=window, ckv=ckv, ratio=ratio, idx=idx, block_t=block_t
  )


def sink_attention(q, kv, idx, sink, *, scale, block_t=512, impl="reference"):
  """out [B,T,H,K], lse [B,T,H] over an explicit index buffer with the sink (reference.py)."""
  _impl(impl)
  return reference.sink_attention(q, kv, idx, sink, scale=scale, block_t=block_t)


def compressed_topk(q, k, w, *, ratio, topk, block_t=512, impl="reference"):
  """Block-causal top-k over compressed indexer keys: idx [B,T,topk] int32, -1 padded."""
  _impl(impl)
  return reference.compressed_indexer_topk(q, k, w, ratio=ratio, topk=topk, block_t=block_t)


def indexer_kl(iq, ik, iw, q, ckv, lse, *, ratio, scale, idx=None, block_t=512, impl="reference"):
  """Per-query indexer KL [B,T] of a CSA layer (reference.v4_indexer_kl); idx None = warm-up."""
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
  return reference.v4_indexer_kl(
    iq, ik, iw, q, ckv, lse, ratio=ratio, scale=scale, idx=idx, block_t=block_t
  )


def teacher_recall(q, ckv, lse, idx, *, ratio, scale, block_t=512):
  """(recall, overlap) [B,T] of a CSA selection against its dense teacher (eval metrics)."""
  return reference.v4_teacher_recall(q, ckv, lse, idx, ratio=ratio, scale=scale, block_t=block_t)


compressed_indexer_logits = reference.compressed_indexer_logits
