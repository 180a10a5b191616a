# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The V4 lightning indexer of CSA layers (docs/v4.md §Indexer).

V3.2's score over compressed keys from the indexer's own compressor:

    q^I_{t,j} = Quant(Had(RoPE_tail(W^{IQ}_j qr_t)))        qr: the attention's normed q latent
    k^I_u     = Quant(Had(RoPE_tail(RMSNorm(pool_u))))       own compressor, m = 4, position u·4
    w_{t,j}   = (W^{Iw} x_t)_j · J^-0.5 · Dᵢ^-0.5
    I_{t,u}   = Σ_j w_{t,j} ReLU(q^I_{t,j} · k^I_u)          only u < (t+1)//4

No key projection and no LayerNorm (V3.2's wk / k_norm); rope interleaved on the LAST R dims;
`indexer_quant` picks the numerics (fp4 per 32 as DeepSeek's reference, fp8, or none). Gradient
wall as in V3.2: x and qr enter detached, so the indexer (with its compressor) learns only from its
KL, and the selection carries no gradient into it from the LM loss.

Letters: B batch, T tokens, U entries, D model, Q q-lora rank, J heads, Dᵢ head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_jax import layers
from dsa_jax.v4 import quant, rope
from dsa_jax.v4.compressor import Compressor
from dsa_jax.v4.config import V4Config


class V4Indexer(nnx.Module):
  def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    j, d = cfg.index_n_heads, cfg.index_head_dim
    self.wq_b = layers.Linear(cfg.q_lora_rank, j * d, ("q_lora", "index_heads"), cfg, rngs=rngs)
    self.weights_proj = layers.Linear(
      cfg.dim, j, ("embed", "index_heads_w"), cfg, rngs=rngs, dtype=jnp.float32
    )
    self.compressor = Compressor(cfg, 4, d, "index_dim", rngs=rngs, indexer=True)

  def query(self, x, qr, cos, sin):
    """x [B,T,D], qr [B,T,Q], cos/sin [T,R/2] (or [B,T,R/2]) -> q [B,T,J,Dᵢ], w [B,T,J] f32."""
    cfg = self.cfg
    x, qr = jax.lax.stop_gradient(x), jax.lax.stop_gradient(qr)
    b, t, _ = x.shape
    q = self.wq_b(qr).reshape(b, t, cfg.index_n_heads, cfg.index_head_dim).astype(jnp.float32)
    q = quant.indexer_fake_quant(rope.rope_tail(q, cos, sin), cfg.indexer_quant, cfg.scale_fmt)
    w = self.weights_proj(x.astype(jnp.float32)) * (
      cfg.index_n_heads**-0.5 * cfg.index_head_dim**-0.5
    )
    return q, w

  def __call__(self, x, qr, cos, sin):
    """x [B,T,D], qr [B,T,Q], cos/sin [T,R/2] -> q [B,T,J,Dᵢ], k [B,U,Dᵢ], w [B,T,J] (f32)."""
    q, w = self.query(x, qr, cos, sin)
    return q, self.compressor(jax.lax.stop_gradient(x)), w
