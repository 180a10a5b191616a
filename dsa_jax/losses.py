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

import functools

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
  [B,T,V] logits: a scan over chunks of `chunk` tokens (f32 logits at 64K tokens and V3.2's
  129,280 vocabulary would take 34 GB, their gradient as much again). Differentiated, each chunk's
  gradients are taken in the forward scan while its logits exist (`_xent_sum`), so the backward
  never rebuilds them.
  x [B,T,D], kernel [D,V], targets [B,T] int, weights [B,T]."""
  if chunk < 1:
    raise ValueError(f"chunk={chunk} must be >= 1 tokens")
  b, t, _ = x.shape
  n = -(-t // chunk)
  pad = n * chunk - t

  def split(a):
    a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
    return jnp.moveaxis(a.reshape((b, n, chunk) + a.shape[2:]), 1, 0)

  w = weights.astype(jnp.float32)
  total = _xent_sum(split(x), kernel, split(targets), split(w), jnp.dtype(compute_dtype))
  return total / jnp.maximum(jnp.sum(w), 1.0)


def _chunk_xent(xc, w_mat, tc, wc):
  """One chunk: (Σ w·(logsumexp - logit at the target), the f32 logits, their logsumexp)."""
  logits = jnp.einsum("btd,dv->btv", xc.astype(w_mat.dtype), w_mat).astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - tgt) * wc), logits, logz


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _xent_sum(xs, kernel, ts, ws, compute_dtype):
  """Σ over chunks of _chunk_xent's loss; xs [n, B, chunk, D], ts and ws [n, B, chunk]."""
  w_mat = kernel.astype(compute_dtype)
  body = lambda total, c: (total + _chunk_xent(c[0], w_mat, c[1], c[2])[0], None)
  return jax.lax.scan(body, jnp.zeros((), jnp.float32), (xs, ts, ws))[0]


def _xent_sum_fwd(xs, kernel, ts, ws, compute_dtype):
  # dlogits = w·(softmax - onehot) in compute_dtype, as autodiff of the bf16 product would pass
  # it on; dx per chunk in x's dtype, d kernel accumulated over chunks in f32.
  w_mat = kernel.astype(compute_dtype)

  def body(carry, c):
    total, dw = carry
    xc, tc, wc = c
    loss, logits, logz = _chunk_xent(xc, w_mat, tc, wc)
    onehot = jax.nn.one_hot(tc, logits.shape[-1], dtype=jnp.float32)
    dlogits = ((jnp.exp(logits - logz[..., None]) - onehot) * wc[..., None]).astype(compute_dtype)
    dx = jnp.einsum("btv,dv->btd", dlogits, w_mat, preferred_element_type=jnp.float32)
    xm = xc.astype(compute_dtype)
    dw = dw + jnp.einsum("btd,btv->dv", xm, dlogits, preferred_element_type=jnp.float32)
    return (total + loss, dw), dx.astype(xc.dtype)

  init = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
  (total, dw), dxs = jax.lax.scan(body, init, (xs, ts, ws))
  return total, (dxs, dw.astype(kernel.dtype))


def _xent_sum_bwd(compute_dtype, res, g):
  dxs, dw = res
  return (g * dxs).astype(dxs.dtype), (g * dw).astype(dw.dtype), None, None


_xent_sum.defvjp(_xent_sum_fwd, _xent_sum_bwd)


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
