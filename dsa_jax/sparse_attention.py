# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The attention dispatch point: sparse MQA attention over top-k rows and dense causal attention.

dsa_jax reaches the attention kernels only through this module (the indexer ops: indexer.py;
tests/test_layering.py enforces both). `sparse_mla` and `sparse_probs` are the sparse-MLA kernel
package's public ops, re-exported: their `impl="reference" | "pallas"` switch, backend choice
(GPU / TPU), shape checks and custom VJP live in pallas_kernels/sparse_mla/ops.py. The dense
attention is dispatched here: `impl="reference"` is pure JAX (chunked over query blocks, never an
[L, L] array); `impl="pallas"` on a GPU takes cuDNN's flash attention where it applies.

Letters: B batch, T queries, S keys, H heads, K qk dim, V value dim, C latent (MQA) dim, k slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels.dense_attention import kernel_mgpu as dense_mgpu
from pallas_kernels.dense_attention import kernel_tpu as dense_tpu
from pallas_kernels.sparse_mla import ops as sparse_mla_ops
from pallas_kernels.v4_attention import ops as v4_attention_ops

# q [B,T,H,C], kv [B,S,C], idx [B,T,k] -> out [B,T,H,d_v], lse [B,T,H]
# (docs/dsa.md §Sparse attention).
sparse_mla = sparse_mla_ops.sparse_mla
# Head-mean attention probabilities at the selected slots [B,T,k] (the sparse KL target; no
# gradient).
sparse_probs = sparse_mla_ops.sparse_mla_probs
# DeepSeek-V4 (docs/v4.md §Attention): window ∪ compressed rows (all visible, or the indexer's
# selection) in one softmax with the per-head sink; and the same over an explicit index buffer.
v4_attention = v4_attention_ops.v4_attention
v4_sink_attention = v4_attention_ops.sink_attention


# The warm-up on one GPU takes its attention and f32 lse from the Mosaic GPU flash kernel
# (warmup_attention); False: cuDNN, and the KL kernels rebuild the lse in a pass of their own.
GPU_WARMUP_ATTENTION_KERNEL = True


def _dense_block(q, k, v, t0, *, scale, s_offset):
  """One query block of causal attention. q [B,t,H,K]; k [B,S,H,K] or [B,S,K] (shared, MQA)."""
  if k.ndim == 3:
    logits = jnp.einsum("bthk,bsk->bhts", q, k, preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32)
  logits = logits * scale
  s = k.shape[1]
  qpos = s_offset + t0[:, :, None]  # [B,t,1]
  visible = jnp.arange(s)[None, None, :] <= qpos  # [B,t,S]
  logits = jnp.where(visible[:, None], logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B,H,t]; every row sees key 0 so it is finite
  p = jnp.exp(logits - lse[..., None])
  if v.ndim == 3:
    out = jnp.einsum("bhts,bsv->bthv", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  else:
    out = jnp.einsum("bhts,bshv->bthv", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype), jnp.moveaxis(lse, 1, 2)


# The remat names of what the attention and KL kernels' forwards keep for their backwards: SAVED
# (row statistics, KL residuals; `saved` names more values: top-k ids, KL target) and SAVED_OUT
# (the sparse attention outputs, the large ones).
SAVED = _common.SAVED
SAVED_OUT = _common.SAVED_OUT
SAVED_PROJ = _common.SAVED_PROJ
saved = _common.saved
# ModelConfig / V4Config.remat_policy -> the jax.checkpoint policy of a remat block (None: save
# nothing, the backward replays the whole block).
REMAT_POLICIES = {
  "full": None,
  "save_attention": jax.checkpoint_policies.save_only_these_names(SAVED, SAVED_OUT),
  "save_selection": jax.checkpoint_policies.save_only_these_names(SAVED),
  "save_projections": jax.checkpoint_policies.save_only_these_names(SAVED, SAVED_OUT, SAVED_PROJ),
}


def _cudnn_ok(q, k, impl: str, with_lse: bool) -> bool:
  return (
    impl == "pallas"
    and not with_lse
    and k.ndim == 4
    and q.shape[1] == k.shape[1]
    and q.dtype in (jnp.bfloat16, jnp.float16)
    and jax.default_backend() == "gpu"
  )


def _cudnn_attention(q, k, v, scale):
  """cuDNN flash attention (causal, T = S); V is zero-padded to K's head dim, which cuDNN needs,
  and the padding is sliced off the output."""
  dv = v.shape[-1]
  if dv < q.shape[-1]:
    v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - dv)))
  return _cudnn_causal(q, k, v.astype(q.dtype), scale)[..., :dv]


def _cudnn_call(q, k, v, scale):
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")


# jax's cuDNN attention keeps its output and softmax statistics for the backward under no remat
# name, so remat_policy="save_attention" would run the forward kernel again in the backward. This
# wrapper names them as the sparse kernels name theirs (the output SAVED_OUT, the rest SAVED).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cudnn_causal(q, k, v, scale):
  return _cudnn_call(q, k, v, scale)


def _cudnn_causal_fwd(q, k, v, scale):
  out, vjp = jax.vjp(lambda *a: _cudnn_call(*a, scale), q, k, v)
  # The output is named where the layer uses it too (the output projection's backward reads it),
  # so the replay needs no forward for it; it is also one of cuDNN's residuals (the same value).
  out_saved = _common.saved(out, SAVED_OUT)
  leaves, treedef = jax.tree_util.tree_flatten(vjp)
  inputs = (q, k, v)  # the remat replay recomputes these from the block's saved inputs
  named = [
    out_saved if x is out else x if any(x is y for y in inputs) else _common.saved(x)
    for x in leaves
  ]
  return out_saved, jax.tree_util.tree_unflatten(treedef, named)


def _cudnn_causal_bwd(scale, vjp, ct):
  return vjp(ct)


_cudnn_causal.defvjp(_cudnn_causal_fwd, _cudnn_causal_bwd)


def dense_attention(
  q, k, v, *, scale: float, block_t: int, impl: str = "reference", with_lse: bool = True
):
  """Causal softmax attention, chunked over query blocks (queries are the last T of S keys).

  With impl="pallas" on a GPU, MHA inputs in bf16/f16 and with_lse=False (the dense phase), the
  cuDNN flash kernel runs instead and lse is None (cuDNN hands its lse back only in bf16, too
  coarse for a KL target; the warm-up KL computes its own). Callers that need lse get the chunked
  f32 path. On a TPU, impl="pallas" runs the splash-attention kernels (MHA or MQA, T = S a
  multiple of the block, one device or inside a shard_map), which also return the f32 lse.

  Args:
    q: [B,T,H,K]; k: [B,S,H,K] (MHA) or [B,S,K] (MQA, shared); v: [B,S,H,V] or [B,S,V].
  Returns:
    out [B,T,H,V] (q.dtype), lse [B,T,H] f32 (None from cuDNN).
  """
  if _cudnn_ok(q, k, impl, with_lse):
    return _cudnn_attention(q, k, v, scale), None
  if impl == "pallas" and jax.default_backend() == "tpu" and not dense_tpu.supported(q, k, v):
    return dense_tpu.causal_attention(q, k, v, scale=scale, with_lse=with_lse)
  b, t = q.shape[:2]
  s_offset = k.shape[1] - t
  t_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  fn = lambda qb, tb: _dense_block(qb, k, v, tb, scale=scale, s_offset=s_offset)
  return _common.map_query_blocks(fn, block_t, [q, t_idx])


def dense_topk_overlap(attn_q, attn_kv, attn_lse, idx, *, scale: float, block_t: int):
  """Share of S_t that is also in the dense attention's own top-k (head-mean probs), per query.

  attn_* in absorbed MQA form; idx [B,T,k] the indexer's selection. Returns [B,T] f32.
  """
  from pallas_kernels.lightning_indexer import reference as ref  # dense target, per block

  b, t, s, kk = attn_q.shape[0], attn_q.shape[1], attn_kv.shape[1], idx.shape[-1]
  t_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))

  def fn(qb, lb, ib, tb):
    visible = jnp.arange(s)[None, None, :] <= (s - t + tb)[..., None]
    p = ref.dense_target_block(qb, attn_kv, lb, visible, scale)
    p = jnp.where(visible, p, -jnp.inf)
    _, top = jax.lax.top_k(p, min(kk, s))
    n_valid = jnp.minimum(s - t + tb + 1, kk)  # [B,t] keys a row can select
    keep = jnp.arange(top.shape[-1]) < n_valid[..., None]
    member = jnp.zeros(p.shape, jnp.bool_)  # [B,t,S] membership of the dense top-k
    member = jnp.put_along_axis(member, top, keep, axis=-1, inplace=False)
    hit = jnp.take_along_axis(member, jnp.maximum(ib, 0), axis=-1) & (ib >= 0)
    return jnp.sum(hit, axis=-1) / n_valid

  return jax.lax.stop_gradient(
    _common.map_query_blocks(fn, block_t, [attn_q, attn_lse, idx, t_idx], remat=False)
  )


def warmup_attention(q, k, v, *, scale: float, block_t: int, impl: str = "reference"):
  """Dense causal attention for the warm-up, with what its KL target needs: (out, lse, q_t,
  scale_t) such that exp(scale_t · q_t·kᵀ - lse) are the attention's probabilities per head.

  On one GPU, or per device inside a shard_map over the whole mesh (impl="pallas", MHA bf16/f16,
  T = S, shapes kernel_mgpu.supported takes), the
  Mosaic GPU flash kernel returns out and an f32 lse from one pass over q pre-scaled once
  (q_t is that q, scale_t = 1), so the KL kernels skip their own lse pass. Elsewhere this is
  dense_attention(with_lse=False): (out, lse or None, q, scale).
  """
  on_gpu = impl == "pallas" and jax.default_backend() == "gpu" and _common.per_device()
  if on_gpu and GPU_WARMUP_ATTENTION_KERNEL and k.ndim == 4 and q.shape[1] == k.shape[1]:
    qs = dense_mgpu.scaled_query(q, float(scale))
    if dense_mgpu.supported(qs, k, v) is None:
      out, lse = dense_mgpu.causal_attention_lse(qs, k, v)
      return out, lse, qs, 1.0
  out, lse = dense_attention(q, k, v, scale=scale, block_t=block_t, impl=impl, with_lse=False)
  return out, lse, q, scale
