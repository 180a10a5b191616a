# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Per-layer attention and indexer maps for analysis (notebooks; short sequences only).

`layer_maps` runs the model layer by layer and returns, for every layer, the dense attention
probabilities of every head (the absorbed MQA form of `MLA.project`, docs/dsa.md §MLA), the
lightning indexer's causal scores and its top-k selection S_t (docs/dsa.md §Top-k). Holds
[B,H,T,T] arrays: for T up to a few thousand.

Letters: B batch, T tokens, H heads, k top-k slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsa_jax import generate, layers
from dsa_jax import indexer as indexer_lib


def layer_maps(model, tokens, *, attention: str = "dense"):
  """tokens [B,T] -> list over layers of dicts with
  probs [B,H,T,T] f32 (causal softmax of each head), index_scores [B,T,T] f32 (-inf above the
  diagonal), idx [B,T,k] int32 (the indexer's top-k, -1 padded). The residual stream between
  layers follows `attention` ("dense" or "sparse"), as in the model's forward."""
  cfg = model.cfg
  b, t = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  cos, sin = layers.rope_angles(cfg, pos)
  h = model.embed_tokens(tokens)
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
  out = []
  for blk in generate.blocks(model):
    x = blk.attn_norm(h)
    pr = blk.attn.project(x, cos, sin, indexer=True)
    logits = jnp.einsum("bthc,bsc->bhts", pr.q_abs, pr.kv_lat, preferred_element_type=jnp.float32)
    logits = jnp.where(causal, logits * cfg.softmax_scale, -jnp.inf)
    iq, ik, iw = pr.iq, pr.ik, pr.iw
    out.append(
      dict(
        probs=jax.nn.softmax(logits, axis=-1),
        index_scores=indexer_lib.indexer_logits(iq, ik, iw),
        idx=indexer_lib.select_topk(
          iq, ik, iw, topk=cfg.index_topk, impl="reference", block_t=cfg.attn_block_q
        ),
      )
    )
    h, _ = blk(h, cos, sin, attention=attention)
  return out


def selected_mass(probs, idx):
  """Attention mass inside S_t: probs [B,H,T,T], idx [B,T,k] -> [B,H,T] (1 = recall of all)."""
  valid = idx >= 0
  sel = jnp.take_along_axis(probs, jnp.where(valid, idx, 0)[:, None], axis=-1)
  return jnp.sum(jnp.where(valid[:, None], sel, 0.0), axis=-1)


def jaccard(idx_a, idx_b, n_keys: int):
  """|S ∩ S'| / |S ∪ S'| of two selections [B,T,k] over n_keys keys -> [B,T]."""

  def member(idx):  # [B,T,S] membership; -1 slots match no key
    return jnp.any(idx[..., None] == jnp.arange(n_keys), axis=-2)

  a, b = member(idx_a), member(idx_b)
  return jnp.sum(a & b, -1) / jnp.maximum(jnp.sum(a | b, -1), 1)
