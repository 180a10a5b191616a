# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Losses (docs/dsa.md §Training).

- LM: next-token cross-entropy, mean over the weighted target tokens; MTP: the same for t+2.
  `*_from_hidden` take the final hidden states and the output head instead of the logits and
  build the logits `chunk` tokens at a time (`head_xent`), so no [B, T, V] array exists.
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


def head_xent(x, kernel, compute_dtype, targets, weights, chunk: int):
  """`xent` of logits = x @ kernel (as layers.Linear computes them, then f32) without the
  [B,T,V] logits: a scan over chunks of `chunk` tokens, each under jax.checkpoint, so the
  backward rebuilds one chunk's logits at a time (f32 logits at 64K tokens and V3.2's 129,280
  vocabulary would take 34 GB, their gradient as much again).
  x [B,T,D], kernel [D,V], targets [B,T] int, weights [B,T]."""
  if chunk < 1:
    raise ValueError(f"chunk={chunk} must be >= 1 tokens")
  b, t, d = x.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  f32 = jnp.float32

  def split(a):
    a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
    return jnp.moveaxis(a.reshape((b, n, chunk) + a.shape[2:]), 1, 0)

  w = weights.astype(f32)
  w_mat = kernel.astype(compute_dtype)

  @jax.checkpoint
  def piece(xc, tc, wc):
    logits = jnp.einsum("btd,dv->btv", xc.astype(compute_dtype), w_mat).astype(f32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - tgt) * wc)

  def body(total, xs):
    return total + piece(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), f32), (split(x), split(targets), split(w)))
  return total / jnp.maximum(jnp.sum(w), 1.0)


def lm_loss_from_hidden(x, head, tokens, loss_mask, chunk: int):
  """lm_loss of logits = head(x) (a layers.Linear), `chunk` tokens at a time."""
  return head_xent(
    x[:, :-1], head.kernel[...], head.compute_dtype, tokens[:, 1:], loss_mask[:, 1:], chunk
  )


def mtp_loss_from_hidden(x, head, tokens, loss_mask, chunk: int):
  """mtp_loss of logits = head(x), `chunk` tokens at a time."""
  return head_xent(
    x[:, :-2], head.kernel[...], head.compute_dtype, tokens[:, 2:], loss_mask[:, 2:], chunk
  )


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
