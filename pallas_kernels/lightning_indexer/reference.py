# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Pure-JAX lightning indexer: logits, fused causal top-k, and the two indexer KL losses.

Indexer logits (docs/dsa.md §Indexer, paper eq. 1):
  I[b,t,s] = Σ_j w[b,t,j] · ReLU(q[b,t,j] · k[b,s])
where q, k are the (Hadamard-rotated, FP8 quant-dequantised) indexer vectors and w already holds
every positive scale (J^-0.5 · D^-0.5; q's FP8 scale is inside the dequantised q).
Causality: queries are the last T of the S keys, so query t sits at position S - T + t and sees
keys s <= S - T + t.

Letters: B batch, T queries, S keys, J indexer heads, D indexer head dim, k selected slots,
H attention heads, C attention latent dim (576).
"""

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels.topk import reference as topk_ref


def _causal_mask(t0, tb, s, offset):
  """[tb, s] True where key s is visible to query t0 + i (absolute position offset + t0 + i)."""
  qpos = offset + t0 + jnp.arange(tb)
  return jnp.arange(s)[None, :] <= qpos[:, None]


def _logits_block(q, k, w, block_s: int):
  """q [B,t,J,D], k [B,S,D], w [B,t,J] -> [B,t,S] f32, streamed over key blocks of block_s."""

  def one(kb):
    z = jnp.einsum("btjd,bsd->btjs", q, kb, preferred_element_type=jnp.float32)
    return jnp.einsum("btj,btjs->bts", w.astype(jnp.float32), jax.nn.relu(z))

  s = k.shape[1]
  if s <= block_s:
    return one(k)
  n = -(-s // block_s)
  kp = _common.pad_axis(k, 1, block_s)
  kb = jnp.moveaxis(kp.reshape(k.shape[0], n, block_s, k.shape[-1]), 1, 0)
  out = jax.lax.map(one, kb)  # [n, B, t, bs]
  out = jnp.moveaxis(out, 0, 2).reshape(q.shape[0], q.shape[1], n * block_s)
  return out[..., :s]


def indexer_logits_reference(q, k, w, *, causal: bool = True, block_s: int = 2048):
  """Full indexer logits [B,T,S] f32 (-inf above the causal diagonal). Small shapes only."""
  i = _logits_block(q, k, w, block_s)
  if causal:
    t, s = q.shape[1], k.shape[1]
    i = jnp.where(_causal_mask(0, t, s, s - t)[None], i, -jnp.inf)
  return i


def indexer_topk_reference(q, k, w, *, topk: int, block_t: int = 512, block_s: int = 2048):
  """Causal top-k of the indexer logits per query, never holding more than [B,block_t,S].

  Returns idx [B,T,topk] int32: row t holds min(topk, S-T+t+1) valid keys, the rest -1; ties go to
  the lower key index.
  """
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  t_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))

  def fn(qb, wb, tb_idx):
    logits = _logits_block(qb, k, wb, block_s)
    visible = jnp.arange(s)[None, None, :] <= (s - t + tb_idx)[..., None]
    logits = jnp.where(visible, logits, -jnp.inf)
    return topk_ref.topk_reference(logits, topk)

  return jax.lax.stop_gradient(_common.map_query_blocks(fn, block_t, [q, w, t_idx], remat=False))


def indexer_logits_at_reference(q, k, w, idx):
  """Indexer logits at the selected keys: [B,T,k] f32, -inf at invalid slots."""
  s = k.shape[1]
  valid = (idx >= 0) & (idx < s)
  rows = jax.vmap(lambda k_b, i_b: k_b[jnp.where(i_b >= 0, i_b, 0)])(k, idx)  # [B,T,k,D]
  z = jnp.einsum("btjd,btsd->btjs", q, rows, preferred_element_type=jnp.float32)
  i = jnp.einsum("btj,btjs->bts", w.astype(jnp.float32), jax.nn.relu(z))
  return jnp.where(valid, i, -jnp.inf)


def _kl(p, logits):
  """Σ_s p (log p - log_softmax(logits)) over valid (finite-logit) slots; 0 for an empty row."""
  valid = jnp.isfinite(logits)
  m = jnp.max(jnp.where(valid, logits, -1e30), axis=-1, keepdims=True)
  z = jnp.where(valid, logits - m, -1e30)
  logq = z - jnp.log(jnp.sum(jnp.where(valid, jnp.exp(z), 0.0), axis=-1, keepdims=True))
  pos = (p > 0) & valid
  terms = jnp.where(pos, p * (jnp.log(jnp.where(pos, p, 1.0)) - logq), 0.0)
  return jnp.sum(terms, axis=-1)


def sparse_kl_reference(q, k, w, idx, p, *, block_t: int = 512):
  """Sparse-phase KL(p_{t,S_t} || softmax(I_{t,S_t})) per query [B,T] f32 (docs/dsa.md §Training).

  p [B,T,k] is the constant target (head-mean attention over S_t, zero at invalid slots).
  Differentiable w.r.t. q, k, w.
  """
  p = jax.lax.stop_gradient(p)
  fn = lambda qb, wb, ib, pb: _kl(pb, indexer_logits_at_reference(qb, k, wb, ib))
  return _common.map_query_blocks(fn, block_t, [q, w, idx, p])


def attn_logits(attn_q, attn_kv):
  """Main-attention logits [B,t,H,S] f32 (unscaled): absorbed MQA form (attn_kv [B,S,C], one
  latent row per key) or MHA form (attn_kv [B,S,H,K], per-head keys; K = 192 for V3.2 against
  576 absorbed, so the same logits for a third of the work)."""
  if attn_kv.ndim == 3:
    return jnp.einsum("bthc,bsc->bths", attn_q, attn_kv, preferred_element_type=jnp.float32)
  return jnp.einsum("bthc,bshc->bths", attn_q, attn_kv, preferred_element_type=jnp.float32)


def dense_target_unnormalised(attn_q, attn_kv, attn_lse, visible, attn_scale):
  """Head-summed attention probabilities [B,t,S] over the visible keys (row sums: H, or less in
  low precision) and the per-head log-sum-exp [B,t,H] they used. attn_lse [B,t,H] or None:
  computed here from the block's logits, which must then span every key of the rows (S)."""
  lg = jnp.where(visible[:, :, None, :], attn_logits(attn_q, attn_kv) * attn_scale, -jnp.inf)
  if attn_lse is None:
    attn_lse = jax.nn.logsumexp(lg, axis=-1)
  return jnp.sum(jnp.exp(lg - attn_lse[..., None]), axis=2), attn_lse


def dense_target_block(attn_q, attn_kv, attn_lse, visible, attn_scale):
  """Warm-up target for a query block: head-summed attention, L1-normalised over causal keys.

  attn_q [B,t,H,C], attn_kv [B,S,C] or [B,S,H,C] (see attn_logits), attn_lse [B,t,H] or None
  (computed from the logits), visible [B,t,S] -> p [B,t,S].
  """
  p, _ = dense_target_unnormalised(attn_q, attn_kv, attn_lse, visible, attn_scale)
  return p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)


def dense_kl_reference(
  q, k, w, attn_q, attn_kv, attn_lse, *, attn_scale: float, block_t: int = 256, block_s=2048
):
  """Dense warm-up KL(p_{t,:} || softmax_{s<=t}(I_{t,:})) per query [B,T] f32 (docs/dsa.md).

  The target p is rebuilt per query block from the main attention (attn_q [B,T,H,C] against
  attn_kv [B,S,C] in absorbed MQA form or [B,S,H,C] in MHA form, and its log-sum-exp attn_lse
  [B,T,H], or None to compute it from the logits, exact in f32 whatever the attention kernel
  returns) and stop-gradient'ed,
  so nothing [T,S]-sized is ever held. Differentiable w.r.t. q, k, w only.
  """
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  attn_q, attn_kv, attn_lse = jax.lax.stop_gradient((attn_q, attn_kv, attn_lse))
  t_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))

  def fn(qb, wb, aqb, tb_idx, alb=None):
    visible = jnp.arange(s)[None, None, :] <= (s - t + tb_idx)[..., None]
    p = jax.lax.stop_gradient(dense_target_block(aqb, attn_kv, alb, visible, attn_scale))
    logits = jnp.where(visible, _logits_block(qb, k, wb, block_s), -jnp.inf)
    return _kl(p, logits)

  xs = [q, w, attn_q, t_idx] + ([] if attn_lse is None else [attn_lse])
  return _common.map_query_blocks(fn, block_t, xs)
