# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Multi-head latent attention with the lightning indexer (docs/dsa.md §MLA).

Two equivalent computations:
- MHA path (dense attention): per-head keys [k_nope ; k_pe] (192) and values (128).
- absorbed MQA path (DSA kernels): q_lat = q_nope·W_UK, query [q_lat ; q_pe] (576)
  against the shared latent [c_kv ; k_pe] (576), values = c_kv (512), then o = o_lat·W_UVᵀ.
Both use the YaRN-mscale-corrected softmax scale (docs/dsa.md §MLA).

Seams: `MLA.project` forms the projections, the absorbed query and the latent rows once
(`Projections`) for training (`MLA.__call__`), decoding (generate.py) and analysis (analysis.py);
`MLA.out_from_latent` maps a latent output back to the model dim. `ATTENTION_MODES` /
`INDEXER_LOSSES` / `check_modes` are the registry of modes (docs/extending.md).

Letters: B batch, T tokens, D model, Q q_lora, C kv_lora (latent), H heads, N nope dim,
R rope dim, V value dim, J/Dᵢ indexer heads/dim, k top-k slots.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_jax import context_parallel, layers, selection, sharding, sparse_attention
from dsa_jax import indexer as indexer_lib
from dsa_jax.config import ModelConfig

# The registry of attention modes and indexer losses (docs/extending.md): the model, the training
# phases (train.PhaseConfig) and decoding (generate.py, DECODE_MODES) validate against these.
ATTENTION_MODES = {
  "dense": "MHA path: per-head keys [c·W_UK ; k_pe] (N+R) and values c·W_UV, causal",
  "dense_mqa": "absorbed MQA path, causal: q_abs against every latent row kv_lat",
  "sparse": "DSA: the indexer's top-k rows per query, sparse MLA over them (absorbed form)",
  # Controls with DSA's budget (issue 21): positional S_t (selection.py), the same sparse MLA.
  "window": "the last index_topk rows per query (sliding window), sparse MLA over them",
  "random": "index_topk rows drawn per query position (selection.random), sparse MLA",
  "random_local": "the last index_topk//2 rows + as many drawn as in 'random', sparse MLA",
}
INDEXER_LOSSES = {
  "none": "no indexer loss",
  "dense": "warm-up KL of the indexer to the dense attention (head-summed, every key)",
  "sparse": "KL over the selected set S_t (needs attention='sparse')",
}
# Decoding attends in the absorbed form over the cache: "dense" there is every visible slot.
DECODE_MODES = ("dense", "sparse")


def check_modes(attention: str, indexer_loss: str = "none", *, where: str = "") -> None:
  """Raises ValueError unless (attention, indexer_loss) is a valid pair of the registry.

  where: a prefix for the message naming the caller's field (e.g. "PhaseConfig.").
  """
  if attention not in ATTENTION_MODES:
    raise ValueError(f"{where}attention={attention!r}; expected one of {tuple(ATTENTION_MODES)}")
  if indexer_loss not in INDEXER_LOSSES:
    raise ValueError(
      f"{where}indexer_loss={indexer_loss!r}; expected one of {tuple(INDEXER_LOSSES)}"
    )
  if indexer_loss == "sparse" and attention != "sparse":
    raise ValueError(f"{where}indexer_loss='sparse' needs attention='sparse'")
  if indexer_loss != "none" and attention in selection.MODES:
    raise ValueError(f"{where}attention={attention!r} takes no indexer loss")


class Projections(NamedTuple):
  """What `MLA.project` computes from the normed input x [B,T,D] (docs/dsa.md §MLA).

  The absorbed query and the latent rows are what every MQA consumer (sparse MLA, dense MQA,
  decoding caches, analysis maps) attends with; the rest feeds the MHA path and the indexer.
  """

  qr: jax.Array  # [B,T,Q] normed query latent (the indexer's query input)
  q_nope: jax.Array  # [B,T,H,N]
  q_pe: jax.Array  # [B,T,H,R] interleaved RoPE applied
  c: jax.Array  # [B,T,C] normed KV latent (also the MQA values)
  k_pe: jax.Array  # [B,T,R] shared rope key, RoPE applied
  q_abs: jax.Array  # [B,T,H,C+R] absorbed query [q_nope·W_UK ; q_pe]
  kv_lat: jax.Array  # [B,T,C+R] latent rows [c ; k_pe]
  iq: jax.Array | None = None  # [B,T,J,Dᵢ] indexer query (with indexer=True)
  ik: jax.Array | None = None  # [B,T,Dᵢ] indexer key
  iw: jax.Array | None = None  # [B,T,J] indexer head weights (all positive scales folded in)


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

  def project(self, x, cos, sin, *, indexer: bool = False) -> Projections:
    """x [B,T,D] (attention-normed), cos/sin [B,T,R/2] -> `Projections`.

    The one place the query/latent projections and the absorbed query are formed; training
    (`__call__`), decoding (generate.py) and analysis (analysis.py) all start here.
    indexer: also run the lightning indexer (iq, ik, iw; otherwise None).
    """
    cfg = self.cfg
    b, t, _ = x.shape
    h, n, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    qr = self.q_norm(self.wq_a(x))
    q = self.wq_b(qr).reshape(b, t, h, n + r)
    q_nope, q_pe = q[..., :n], layers.rope_interleaved(q[..., n:], cos, sin)
    kv = self.wkv_a(x)
    c = self.kv_norm(kv[..., : cfg.kv_lora_rank])
    k_pe = layers.rope_interleaved(kv[..., cfg.kv_lora_rank :], cos, sin)
    w_uk, _ = self._wkv_b()
    q_abs = jnp.concatenate([jnp.einsum("bthn,chn->bthc", q_nope, w_uk), q_pe], axis=-1)
    kv_lat = jnp.concatenate([c, k_pe], axis=-1)
    iq = ik = iw = None
    if indexer:
      iq, ik, iw = self.indexer(x, qr, cos, sin)
    return Projections(qr, q_nope, q_pe, c, k_pe, q_abs, kv_lat, iq, ik, iw)

  def out_from_latent(self, o_lat):
    """Latent attention output o_lat [B,T,H,C] -> [B,T,D]: o = o_lat·W_UVᵀ per head, then wo."""
    cfg = self.cfg
    b, t = o_lat.shape[:2]
    o = jnp.einsum("bthc,chv->bthv", o_lat, self._wkv_b()[1])
    return self.wo(o.reshape(b, t, cfg.n_heads * cfg.v_head_dim))

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

    attention: "dense" (MHA path), "dense_mqa" (absorbed path, dense causal), "sparse" (DSA),
      or a positional control "window" | "random" | "random_local" (selection.py).
    indexer_loss: "none", "dense" (warm-up KL vs the dense attention), "sparse" (KL over S_t).
    metrics: also report the recall of S_t (the indexer's, or the control's) and its overlap
      with the dense top-k (costs a dense pass).
    """
    cfg = self.cfg
    check_modes(attention, indexer_loss)
    b, t, _ = x.shape
    h, v = cfg.n_heads, cfg.v_head_dim
    scale = kl_scale = cfg.softmax_scale
    warm = None  # (out, kl) of the warm-up's batch-parallel path on a mesh
    need_idx = attention == "sparse" or metrics
    pr = self.project(x, cos, sin, indexer=need_idx or indexer_loss != "none")
    q_abs, kv_lat, iq, ik, iw = pr.q_abs, pr.kv_lat, pr.iq, pr.ik, pr.iw
    aux = {}
    # On a mesh the sparse path runs in shard_map: sequence-parallel top-k + sparse MLA + KL.
    ctx = sharding.current() if attention == "sparse" and not metrics else None
    if ctx is not None:
      o_lat, lse, cp_kl = context_parallel.sparse_attention_cp(
        ctx, q_abs, kv_lat, iq, ik, iw, cfg, with_kl=indexer_loss == "sparse"
      )
    elif attention in selection.MODES:
      if sharding.current() is not None and cfg.impl == "pallas":  # cannot be auto-partitioned
        raise ValueError(f"attention={attention!r} with impl='pallas' runs on one device")
      idx = selection.select(attention, b, t, t, cfg.index_topk)
    elif need_idx:
      idx = indexer_lib.select_topk(
        iq, ik, iw, topk=cfg.index_topk, impl=cfg.impl, block_t=cfg.attn_block_q
      )
      idx = sparse_attention.saved(idx)  # remat_policy="save_attention": no second top-k

    if attention == "dense":
      w_uk, w_uv = self._wkv_b()
      kvb = jnp.einsum("btc,chd->bthd", pr.c, jnp.concatenate([w_uk, w_uv], axis=-1))
      k_nope, val = kvb[..., : cfg.qk_nope_head_dim], kvb[..., cfg.qk_nope_head_dim :]
      k_pe = pr.k_pe
      k = jnp.concatenate(
        [k_nope, jnp.broadcast_to(k_pe[:, :, None], k_nope.shape[:3] + k_pe.shape[-1:])], -1
      )
      q = jnp.concatenate([pr.q_nope, pr.q_pe], axis=-1)
      mesh_ctx = sharding.current()
      if indexer_loss == "dense" and not metrics and mesh_ctx is not None and cfg.impl == "pallas":
        # per device inside a shard_map over batch, where only batch is split (else None)
        warm = context_parallel.warmup_batch_parallel(mesh_ctx, q, k, val, iq, ik, iw, cfg)
      if warm is not None:
        o, warm_kl = warm
      elif indexer_loss == "dense" and not metrics:
        # the KL target's query and scale: those the attention's lse belongs to
        o, lse, q, kl_scale = sparse_attention.warmup_attention(
          q, k, val, scale=scale, block_t=cfg.attn_block_q, impl=cfg.impl
        )
      else:
        o, lse = sparse_attention.dense_attention(
          q,
          k,
          val,
          scale=scale,
          block_t=cfg.attn_block_q,
          impl=cfg.impl,
          with_lse=metrics,  # the warm-up KL computes its own f32 lse when this gives none
        )
      out = self.wo(o.reshape(b, t, h * v))
    else:
      if ctx is not None:
        pass  # o_lat, lse from the context-parallel path above
      elif attention == "dense_mqa":
        o_lat, lse = sparse_attention.dense_attention(
          q_abs, kv_lat, pr.c, scale=scale, block_t=cfg.attn_block_q, impl=cfg.impl
        )
      else:
        o_lat, lse = sparse_attention.sparse_mla(
          q_abs, kv_lat, idx, scale=scale, d_v=cfg.kv_lora_rank, impl=cfg.impl
        )
      out = self.out_from_latent(o_lat)

    if indexer_loss == "dense" and warm is not None:
      aux["indexer_kl"] = jnp.mean(warm_kl)
    elif indexer_loss == "dense":
      # The target's logits in the form the attention ran: MHA (192 per head) is a third of the
      # work of the absorbed form (576).
      aq, akv = (q, k) if attention == "dense" else (q_abs, kv_lat)
      kl = indexer_lib.dense_kl(
        iq, ik, iw, aq, akv, lse, attn_scale=kl_scale, impl=cfg.impl, block_t=cfg.attn_block_q
      )
      aux["indexer_kl"] = jnp.mean(kl)
    elif indexer_loss == "sparse" and ctx is not None:
      aux["indexer_kl"] = jnp.mean(cp_kl)
    elif indexer_loss == "sparse":
      p = sparse_attention.saved(
        sparse_attention.sparse_probs(q_abs, kv_lat, idx, lse, scale=scale, impl=cfg.impl)
      )
      aux["indexer_kl"] = jnp.mean(indexer_lib.sparse_kl(iq, ik, iw, idx, p, impl=cfg.impl))
    if metrics:
      q_s, kv_s = jax.lax.stop_gradient((q_abs, kv_lat))
      if attention not in ("dense", "dense_mqa"):  # recall is measured against dense attention
        _, lse_d = sparse_attention.dense_attention(
          q_s,
          kv_s,
          kv_s[..., : cfg.kv_lora_rank],
          scale=scale,
          block_t=cfg.attn_block_q,
          impl=cfg.impl,
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
