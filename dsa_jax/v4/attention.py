# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""One V4 attention layer: window-only (m = 0), CSA (m = 4) or HCA (m > 4) (docs/v4.md §Attention).

    qr = RMSNorm(x·W_qa)                                  [B,T,Q]   (also the indexer's query input)
    q  = RoPE_tail(RMSNorm_unweighted(qr·W_qb))           [B,T,H,K] per-head norm, no weight
    kv = Quant_nope(RoPE_tail(RMSNorm(x·W_kv)))           [B,T,K]   one row per token, K = V
    c  = Compressor(x)                                    [B,U,K]   (m > 0)
    o  = softmax over window(t) ∪ entries(t) ∪ {sink_h} with scale K^-0.5, values = the same rows
    o  = RoPE_tail^-1(o) at t;  y = W_ob · concat_o(o_o · W_oa[o])   grouped low-rank output

entries(t): CSA sparse = the indexer's top-k among u < (t+1)//4; CSA dense (the dense training
stage) and HCA = every u < (t+1)//m. The rows are never de-duplicated against the window.

Letters: B batch, T tokens, U entries, D model, Q q-lora rank, H heads, K row dim, O output
groups, I = H·K/O group input, Y o-lora rank, k selected entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_jax import indexer as indexer_lib
from dsa_jax import layers, sharding, sparse_attention
from dsa_jax.v4 import rope
from dsa_jax.v4.compressor import Compressor, quant_nope
from dsa_jax.v4.config import V4Config
from dsa_jax.v4.indexer import V4Indexer

# Attention modes (the training stages, docs/v4.md §Training): HCA and window-only layers are the
# same in both; they differ in what a CSA layer attends to.
ATTENTION_MODES = {
  "dense": "CSA attends to the window and every visible compressed entry (stage 1, warm-up)",
  "sparse": "CSA attends to the window and the indexer's top-k compressed entries (stage 3)",
}


# Indexer losses of CSA layers (docs/v4.md §Training): the teacher is the head-summed joint
# softmax (window ∪ compressed ∪ sink) restricted to the compressed support and L1-normalised.
INDEXER_LOSSES = {
  "none": "no indexer loss (the indexer is not run unless attention='sparse')",
  "dense": "warm-up KL over every visible compressed entry (needs attention='dense')",
  "sparse": "KL over the selected entries S_t (needs attention='sparse')",
}


def check_mode(attention: str, indexer_loss: str = "none") -> None:
  if attention not in ATTENTION_MODES:
    raise ValueError(f"V4 attention={attention!r}; expected one of {tuple(ATTENTION_MODES)}")
  if indexer_loss not in INDEXER_LOSSES:
    raise ValueError(f"V4 indexer_loss={indexer_loss!r}; expected one of {tuple(INDEXER_LOSSES)}")
  if indexer_loss != "none" and indexer_loss != attention:
    raise ValueError(f"V4 indexer_loss={indexer_loss!r} needs attention={indexer_loss!r}")


def unweighted_rms_norm(x, eps: float):
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class V4Attention(nnx.Module):
  def __init__(self, cfg: V4Config, ratio: int, *, rngs: nnx.Rngs):
    self.cfg, self.ratio = cfg, ratio
    d, h, k, q = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.q_lora_rank
    o, y = cfg.o_groups, cfg.o_lora_rank
    self.wq_a = layers.Linear(d, q, ("embed", "q_lora"), cfg, rngs=rngs)
    self.q_norm = layers.RMSNorm(q, cfg.norm_eps)
    self.wq_b = layers.Linear(q, h * k, ("q_lora", "heads"), cfg, rngs=rngs)
    self.wkv = layers.Linear(d, k, ("embed", "kv_latent"), cfg, rngs=rngs)
    self.kv_norm = layers.RMSNorm(k, cfg.norm_eps)
    # Per-head sink logit (fp32, 0 at init): a softmax term with no value.
    self.attn_sink = nnx.Param(jnp.zeros((h,), jnp.float32), logical_axes=("heads",))
    pd = layers.dtype_of(cfg.param_dtype)
    # wo_a [O, I, Y]: group o maps its heads' I = H·K/O outputs to Y.
    self.wo_a = layers.param(
      rngs, (o, h * k // o, y), ("o_groups", "o_group_in", "o_lora"), cfg.init_std, pd
    )
    self.wo_b = layers.Linear(o * y, d, ("o_groups", "embed"), cfg, rngs=rngs)
    self.compressor = Compressor(cfg, ratio, k, "kv_latent", rngs=rngs) if ratio else None
    self.indexer = V4Indexer(cfg, rngs=rngs) if ratio == 4 else None

  def rope_angles(self, t: int):
    """cos, sin [T,R/2] of this layer's table (compressed layers: compress theta + YaRN)."""
    return rope.angles(self.cfg, jnp.arange(t), compressed=self.ratio > 0)

  def project(self, x, cos, sin):
    """x [B,T,D] normed -> qr [B,T,Q], q [B,T,H,K], kv [B,T,K] (rope applied, rows quantised)."""
    cfg = self.cfg
    b, t, _ = x.shape
    qr = self.q_norm(self.wq_a(x))
    q = self.wq_b(qr).reshape(b, t, cfg.n_heads, cfg.head_dim)
    q = rope.rope_tail(unweighted_rms_norm(q, cfg.norm_eps), cos, sin)
    q = sharding.shard(q, ("batch", "seq", "act_heads", None))
    kv = quant_nope(rope.rope_tail(self.kv_norm(self.wkv(x)), cos, sin), cfg)
    return qr, q, kv

  def select(self, iq, ik, iw):
    """The indexer's top-k compressed entries [B,T,k] int32 (-1 = none) of a CSA layer."""
    cfg = self.cfg
    idx = indexer_lib.v4_select_topk(
      iq, ik, iw, ratio=4, topk=cfg.index_topk, block_t=cfg.attn_block_q, impl=cfg.impl
    )
    return sparse_attention.saved(idx)  # remat_policy="save_attention": no second top-k

  def output(self, o, cos, sin):
    """o [B,T,H,K] -> inverse rope at the query position, grouped low-rank projection [B,T,D]."""
    cfg = self.cfg
    b, t = o.shape[:2]
    o = rope.rope_tail(o, cos, sin, inverse=True).reshape(b, t, cfg.o_groups, -1)
    cd = layers.dtype_of(cfg.compute_dtype)
    z = jnp.einsum("btoi,oiy->btoy", o.astype(cd), self.wo_a[...].astype(cd))
    return self.wo_b(z.reshape(b, t, -1))

  def attend(self, q, kv, ckv, idx):
    """(o [B,T,H,K], lse [B,T,H]) over window ∪ entries (idx None: every visible) ∪ sink."""
    cfg = self.cfg
    return sparse_attention.v4_attention(
      q,
      kv,
      self.attn_sink[...],
      scale=cfg.softmax_scale,
      window=cfg.window_size,
      ckv=ckv,
      ratio=self.ratio,
      idx=idx,
      block_t=cfg.attn_block_q,
      impl=cfg.impl,
    )

  def __call__(
    self, x, *, attention: str = "dense", indexer_loss: str = "none", metrics: bool = False
  ):
    """x [B,T,D] (normed; positions 0..T-1) -> (y [B,T,D], aux).

    aux of a CSA layer: `topk_idx` [B,T,k] when the indexer ran; `indexer_kl` (mean over
    queries) with an indexer loss; `indexer_recall` / `topk_overlap` (means) with metrics.
    """
    cfg = self.cfg
    check_mode(attention, indexer_loss)
    cos, sin = self.rope_angles(x.shape[1])
    qr, q, kv = self.project(x, cos, sin)
    ckv = self.compressor(x) if self.compressor is not None else None
    aux, idx = {}, None
    run_indexer = self.indexer is not None and (
      attention == "sparse" or indexer_loss != "none" or metrics
    )
    if run_indexer:
      iq, ik, iw = self.indexer(x, qr, cos, sin)
      sel = self.select(iq, ik, iw)
      aux["topk_idx"] = sel
      idx = sel if attention == "sparse" else None
    o, lse = self.attend(q, kv, ckv, idx)
    if run_indexer and indexer_loss != "none":
      kl = indexer_lib.v4_indexer_kl(
        iq,
        ik,
        iw,
        q,
        ckv,
        lse,
        ratio=self.ratio,
        scale=cfg.softmax_scale,
        idx=idx,
        block_t=cfg.attn_block_q,
        impl=cfg.impl,
      )
      aux["indexer_kl"] = jnp.mean(kl)
    if run_indexer and metrics:
      # Recall is measured against the dense stage's distribution (every visible entry).
      lse_d = lse if idx is None else jax.lax.stop_gradient(self.attend(q, kv, ckv, None)[1])
      recall, overlap = indexer_lib.v4_teacher_recall(
        q, ckv, lse_d, sel, ratio=self.ratio, scale=cfg.softmax_scale, block_t=cfg.attn_block_q
      )
      aux["indexer_recall"], aux["topk_overlap"] = jnp.mean(recall), jnp.mean(overlap)
    return self.output(o, cos, sin), aux
