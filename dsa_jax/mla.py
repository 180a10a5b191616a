# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Multi-head latent attention with the lightning indexer (docs/dsa.md §MLA).

Two equivalent computations:
- MHA path (dense attention): per-head keys [k_nope ; k_pe] (192) and values (128).
- absorbed MQA path (DSA kernels): q_lat = q_nope·W_UK, query [q_lat ; q_pe] (576)
  against the shared latent [c_kv ; k_pe] (576), values = c_kv (512), then o = o_lat·W_UVᵀ.
Both use the YaRN-mscale-corrected softmax scale (docs/dsa.md §MLA).

Letters: B batch, T tokens, D model, Q q_lora, C kv_lora (latent), H heads, N nope dim,
R rope dim, V value dim, J/Dᵢ indexer heads/dim, k top-k slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_jax import context_parallel, layers, sharding, sparse_attention
from dsa_jax import indexer as indexer_lib
from dsa_jax.config import ModelConfig

ATTENTION_MODES = ("dense", "dense_mqa", "sparse")
INDEXER_LOSSES = ("none", "dense", "sparse")


class MLA(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    h, n, r, v = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    self.wq_a = layers.Linear(cfg.dim, cfg.q_lora_rank, ("embed", "q_lora"), cfg, rngs=rngs)
    self.q_norm = layers.RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
    self.wq_b = layers.Linear(cfg.q_lora_rank, h * (n + r), ("q_lora", "heads"), cfg, rngs=rngs)
    self.wkv_a = layers.Linear(cfg.dim, cfg.latent_dim, ("embed", "kv_latent"), cfg, rngs=rngs)
    self.kv_norm = layers.RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
    self.wkv_b = layers.Linear(cfg.kv_lora_rank, h * (n + v), ("kv_lora", "heads"), cfg, rngs=rngs)
    self.wo = layers.Linear(h * v, cfg.dim, ("heads", "embed"), cfg, rngs=rngs)
    self.indexer = indexer_lib.LightningIndexer(cfg, rngs=rngs)

  def _project(self, x, cos, sin):
    cfg = self.cfg
    b, t, _ = x.shape
    h, n, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    qr = self.q_norm(self.wq_a(x))
    q = self.wq_b(qr).reshape(b, t, h, n + r)
    q_nope, q_pe = q[..., :n], layers.rope_interleaved(q[..., n:], cos, sin)
    kv = self.wkv_a(x)
    c = self.kv_norm(kv[..., : cfg.kv_lora_rank])
    k_pe = layers.rope_interleaved(kv[..., cfg.kv_lora_rank :], cos, sin)
    return qr, q_nope, q_pe, c, k_pe

  def _wkv_b(self):
    cfg = self.cfg
    h, n, v = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    w = self.wkv_b.kernel[...].astype(layers.dtype_of(cfg.compute_dtype))
    w = w.reshape(cfg.kv_lora_rank, h, n + v)
    return w[..., :n], w[..., n:]  # W_UK [C,H,N], W_UV [C,H,V]

  def __call__(
    self,
    x,
    cos,
    sin,
    *,
    attention: str = "dense",
    indexer_loss: str = "none",
    metrics: bool = False,
  ):
    """x [B,T,D] (attention-normed) -> (out [B,T,D], aux dict of per-layer scalars/arrays).

    attention: "dense" (MHA path), "dense_mqa" (absorbed path, dense causal), "sparse" (DSA).
    indexer_loss: "none", "dense" (warm-up KL vs the dense attention), "sparse" (KL over S_t).
    metrics: also report indexer recall and overlap with the dense top-k (costs a dense pass).
    """
    cfg = self.cfg
    if attention not in ATTENTION_MODES:
      raise ValueError(f"attention={attention!r}; expected one of {ATTENTION_MODES}")
    if indexer_loss not in INDEXER_LOSSES:
      raise ValueError(f"indexer_loss={indexer_loss!r}; expected one of {INDEXER_LOSSES}")
    if indexer_loss == "sparse" and attention != "sparse":
      raise ValueError("indexer_loss='sparse' needs attention='sparse'")
    b, t, _ = x.shape
    h, v = cfg.n_heads, cfg.v_head_dim
    scale = cfg.softmax_scale
    qr, q_nope, q_pe, c, k_pe = self._project(x, cos, sin)
    w_uk, w_uv = self._wkv_b()
    # Absorbed query and shared latent rows.
    q_abs = jnp.concatenate([jnp.einsum("bthn,chn->bthc", q_nope, w_uk), q_pe], axis=-1)
    kv_lat = jnp.concatenate([c, k_pe], axis=-1)
    aux = {}
    need_idx = attention == "sparse" or metrics
    if need_idx or indexer_loss != "none":
      iq, ik, iw = self.indexer(x, qr, cos, sin)
    # On a mesh the sparse path runs in shard_map: sequence-parallel top-k + sparse MLA + KL.
    ctx = sharding.current() if attention == "sparse" and not metrics else None
    if ctx is not None:
      o_lat, lse, cp_kl = context_parallel.sparse_attention_cp(
        ctx, q_abs, kv_lat, iq, ik, iw, cfg, with_kl=indexer_loss == "sparse"
      )
    elif need_idx:
      idx = indexer_lib.select_topk(
        iq, ik, iw, topk=cfg.index_topk, impl=cfg.impl, block_t=cfg.attn_block_q
      )

    if attention == "dense":
      kvb = jnp.einsum("btc,chd->bthd", c, jnp.concatenate([w_uk, w_uv], axis=-1))
      k_nope, val = kvb[..., : cfg.qk_nope_head_dim], kvb[..., cfg.qk_nope_head_dim :]
      k = jnp.concatenate(
        [k_nope, jnp.broadcast_to(k_pe[:, :, None], k_nope.shape[:3] + k_pe.shape[-1:])], -1
      )
      q = jnp.concatenate([q_nope, q_pe], axis=-1)
      o, lse = sparse_attention.dense_attention(
        q,
        k,
        val,
        scale=scale,
        block_t=cfg.attn_block_q,
        impl=cfg.impl,
        with_lse=metrics,  # the warm-up KL computes its own f32 lse when this gives none
      )
    else:
      if ctx is not None:
        pass  # o_lat, lse from the context-parallel path above
      elif attention == "dense_mqa":
        o_lat, lse = sparse_attention.dense_attention(
          q_abs, kv_lat, c, scale=scale, block_t=cfg.attn_block_q
        )
      else:
        o_lat, lse = sparse_attention.sparse_mla(
          q_abs, kv_lat, idx, scale=scale, d_v=cfg.kv_lora_rank, impl=cfg.impl
        )
      o = jnp.einsum("bthc,chv->bthv", o_lat, w_uv)
    out = self.wo(o.reshape(b, t, h * v))

    if indexer_loss == "dense":
      # The target's logits in the form the attention ran: MHA (192 per head) is a third of the
      # work of the absorbed form (576).
      aq, akv = (q, k) if attention == "dense" else (q_abs, kv_lat)
      kl = indexer_lib.dense_kl(
        iq, ik, iw, aq, akv, lse, attn_scale=scale, impl=cfg.impl, block_t=cfg.attn_block_q
      )
      aux["indexer_kl"] = jnp.mean(kl)
    elif indexer_loss == "sparse" and ctx is not None:
      aux["indexer_kl"] = jnp.mean(cp_kl)
    elif indexer_loss == "sparse":
      p = sparse_attention.sparse_probs(q_abs, kv_lat, idx, lse, scale=scale, impl=cfg.impl)
      aux["indexer_kl"] = jnp.mean(indexer_lib.sparse_kl(iq, ik, iw, idx, p, impl=cfg.impl))
    if metrics:
      q_s, kv_s = jax.lax.stop_gradient((q_abs, kv_lat))
      if attention == "sparse":  # recall is measured against the dense attention
        _, lse_d = sparse_attention.dense_attention(
          q_s, kv_s, kv_s[..., : cfg.kv_lora_rank], scale=scale, block_t=cfg.attn_block_q
        )
      else:
        lse_d = jax.lax.stop_gradient(lse)
      # Dense attention mass inside S_t: head-mean probabilities at the selected slots, summed.
      p_sel = sparse_attention.sparse_probs(q_s, kv_s, idx, lse_d, scale=scale, impl="reference")
      aux["indexer_recall"] = jnp.mean(jnp.sum(p_sel, axis=-1))
      aux["topk_overlap"] = jnp.mean(
        sparse_attention.dense_topk_overlap(
          q_s, kv_s, lse_d, idx, scale=scale, block_t=cfg.attn_block_q
        )
      )
    return out, aux
