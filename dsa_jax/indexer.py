# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Lightning indexer (docs/dsa.md §Indexer): the module, and the dispatch of the indexer ops.

`LightningIndexer` computes the indexer's q, k, w; `select_topk`, `indexer_logits`, `sparse_kl`
and `dense_kl` (bottom of the file) are the kernel entry points for them.

    q^I_{t,j} = Had(RoPE_half(W^{IQ}_j qr_t)),   k^I_s = Had(RoPE_half(LayerNorm(W^{IK} x_s)))
    w_{t,j}   = (W^{Iw} x_t)_j · J^-0.5 · D^-0.5
    I_{t,s}   = Σ_j w_{t,j} ReLU(q^I_{t,j} · k^I_s)

With `indexer_dtype="fp8"` q and k are Hadamard-rotated and FP8 e4m3 quantise-dequantised per
128-vector with power-of-two scales, as DeepSeek's reference does; "bfloat16"/"float32" give the
plain indexer (HF transformers' port: no Hadamard, no FP8).

Gradient wall (docs/dsa.md §Training, "separate optimisation"): the indexer reads stop_gradient(x)
and stop_gradient(qr), so its KL loss never reaches the main model; top-k indices carry no gradient,
so the LM loss never reaches the indexer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_jax import layers
from dsa_jax.config import ModelConfig
from pallas_kernels.lightning_indexer import ops as indexer_ops
from pallas_kernels.v4_attention import ops as v4_attention_ops


class LightningIndexer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    j, d = cfg.index_n_heads, cfg.index_head_dim
    self.wq_b = layers.Linear(cfg.q_lora_rank, j * d, ("q_lora", "index_heads"), cfg, rngs=rngs)
    self.wk = layers.Linear(cfg.dim, d, ("embed", "index_dim"), cfg, rngs=rngs)
    self.k_norm = layers.LayerNorm(d, cfg.norm_eps)
    # fp32 weights_proj as in DeepSeek's corrected reference code.
    self.weights_proj = layers.Linear(
      cfg.dim, j, ("embed", "index_heads_w"), cfg, rngs=rngs, dtype=jnp.float32
    )

  def __call__(self, x, qr, cos, sin):
    """x [B,T,D], qr [B,T,Q] (normed q latent), cos/sin [B,T,R/2] -> q [B,T,J,Dᵢ], k [B,T,Dᵢ], w [B,T,J].

    The returned q, k are what the score kernel consumes (rotated, and FP8-rounded in fp8 mode);
    w holds every positive scale so that I = Σ_j w·ReLU(q·k).
    """
    cfg = self.cfg
    x = jax.lax.stop_gradient(x)
    qr = jax.lax.stop_gradient(qr)
    b, t, _ = x.shape
    j, d, r = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
    q = self.wq_b(qr).reshape(b, t, j, d)
    # The rope part is FIRST in the indexer (docs/dsa.md §Indexer), rotated half-split.
    q = jnp.concatenate([layers.rope_half(q[..., :r], cos, sin), q[..., r:]], axis=-1)
    k = self.k_norm(self.wk(x))
    k = jnp.concatenate([layers.rope_half(k[..., :r], cos, sin), k[..., r:]], axis=-1)
    w = self.weights_proj(x.astype(jnp.float32)) * (j**-0.5 * d**-0.5)
    if cfg.indexer_dtype == "fp8":
      q = layers.fp8_quant_dequant(layers.hadamard(q), cfg.scale_fmt)
      k = layers.fp8_quant_dequant(layers.hadamard(k), cfg.scale_fmt)
    else:
      dt = layers.dtype_of(cfg.indexer_dtype)
      q, k = q.astype(dt), k.astype(dt)
    return q, k, w


# ----------------------------------------------------------------------------------------------
# Dispatch: the indexer ops the library calls, re-exported from the kernel package. Their
# `impl="reference" | "pallas"` switch, backend choice (GPU / TPU), shape checks and custom VJPs
# live in pallas_kernels/lightning_indexer/ops.py; dsa_jax reaches them only through this module
# (attention ops: sparse_attention.py), which tests/test_layering.py enforces.

# Causal top-k key indices [B,T,topk] int32, k_eff = min(topk, pos + 1), -1 padded; `offset`
# (GPU kernel path only) is the global position of query 0, e.g. a context-parallel shard's start.
# See docs/dsa.md §Top-k.
select_topk = indexer_ops.indexer_topk
# Logits [B,T,S] f32, -inf above the causal diagonal when causal (small shapes / query blocks).
indexer_logits = indexer_ops.indexer_logits
# Per-query KL over the selected set [B,T] (docs/dsa.md §Training).
sparse_kl = indexer_ops.sparse_kl
# Per-query dense warm-up KL [B,T] (docs/dsa.md §Training), target rebuilt per query block.
dense_kl = indexer_ops.dense_kl
# DeepSeek-V4 CSA (docs/v4.md §Indexer): top-k over compressed keys, block-causal j < (t+1)//m.
v4_select_topk = v4_attention_ops.compressed_topk
v4_indexer_logits = v4_attention_ops.compressed_indexer_logits
# V4 CSA indexer loss [B,T] (docs/v4.md §Training) and its eval metrics against the dense teacher.
v4_indexer_kl = v4_attention_ops.indexer_kl
v4_teacher_recall = v4_attention_ops.teacher_recall
