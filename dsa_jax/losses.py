# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Losses (docs/dsa.md §Training).

- LM: next-token cross-entropy, mean over the weighted target tokens; MTP: the same for t+2.
- Indexer KL: computed inside each attention layer, streamed per query block (the target p is
  rebuilt from the attention logits and their log-sum-exp, never a [B, L, L] tensor), see
  `pallas_kernels/lightning_indexer/reference.py`. Exact KL(p || softmax(I)), no clipping.
  Reduction: mean over query tokens within a layer, then mean over layers (the MTP layer's indexer
  included when MTP runs). DeepSeek does not publish theirs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def xent(logits, targets, weights):
  """Weighted mean cross-entropy. logits [B,T,V] f32, targets [B,T] int, weights [B,T]."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = logz - tgt
  w = weights.astype(jnp.float32)
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def lm_loss(logits, tokens, loss_mask):
  """Position t predicts token t+1; loss_mask[t+1] weights that prediction."""
  return xent(logits[:, :-1], tokens[:, 1:], loss_mask[:, 1:])


def mtp_loss(mtp_logits, tokens, loss_mask):
  """MTP position t predicts token t+2 (DeepSeek-V3 §2.2)."""
  return xent(mtp_logits[:, :-2], tokens[:, 2:], loss_mask[:, 2:])


def indexer_kl(aux) -> jax.Array:
  """Mean over layers of the per-layer mean KL (see module docstring)."""
  vals = [aux["indexer_kl"]]
  if "mtp_indexer_kl" in aux:
    vals.append(aux["mtp_indexer_kl"][None])
  return jnp.mean(jnp.concatenate(vals))


def answer_accuracy(logits, tokens, answer_mask):
  """Per row (teacher forced argmax): (exact = every masked target right, share of them right)."""
  pred = jnp.argmax(logits[:, :-1], axis=-1)
  m = answer_mask[:, 1:] > 0
  hit = pred == tokens[:, 1:]
  exact = jnp.all(jnp.where(m, hit, True), axis=-1).astype(jnp.float32)
  share = jnp.sum(hit & m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1)
  return exact, share
