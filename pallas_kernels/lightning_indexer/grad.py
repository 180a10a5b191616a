# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Indexer-loss KL ops with hand-written, streamed backward passes (docs/dsa.md §Training).

With P = softmax(I) over the row's valid keys, p the constant target and
  g[t,s] = dKL_t/dI[t,s] = P[t,s] · Σ_{s'} p[t,s'] - p[t,s]
(Σp = 1 for a normalised target), and z = q_j·k_s:
  dw[t,j] = Σ_s g · ReLU(z)        dq[t,j] = Σ_s g · w[t,j] · 1[z>0] · k_s
  dk[s]   = Σ_t Σ_j g · w[t,j] · 1[z>0] · q[t,j]   (scatter-add over the queries that use s)

sparse_kl: streamed over query blocks; dk is a scatter-add of [block_t, k, D] rows per block.
dense_kl: streamed over query blocks, and inside each over key blocks in two sweeps (row
normalisers of softmax(I) and of the target first, then the gradients), so nothing [T,S]-sized
exists; dk for a key block is the sum over the query block. Plain jnp (XLA) for now: a Pallas
version of the same sweeps is the next step (the forward logits already have an FP8 kernel).
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels.lightning_indexer import reference as ref


def _blocks(x, bt, axis=1):
  """[..., T, ...] -> [n, ..., bt, ...] (T padded up to n·bt with zeros)."""
  x = _common.pad_axis(x, axis, bt)
  n = x.shape[axis] // bt
  x = x.reshape(x.shape[:axis] + (n, bt) + x.shape[axis + 1 :])
  return jnp.moveaxis(x, axis, 0)


def _unblocks(y, t, axis=1):
  y = jnp.moveaxis(y, 0, axis)
  y = y.reshape(y.shape[:axis] + (-1,) + y.shape[axis + 2 :])
  return jax.lax.slice_in_dim(y, 0, t, axis=axis)


# ---------------------------------------------------------------------------------------------
# sparse phase: KL over the selected keys
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def sparse_kl(q, k, w, idx, p, block_t=512):
  """KL(p || softmax(I over idx)) per query [B,T]; q [B,T,J,D], k [B,S,D], w [B,T,J]."""
  return ref.sparse_kl_reference(q, k, w, idx, jax.lax.stop_gradient(p), block_t=block_t)


def _sparse_fwd(q, k, w, idx, p, block_t):
  return sparse_kl(q, k, w, idx, p, block_t), (q, k, w, idx, p)


def _sparse_bwd(block_t, res, dl):
  q, k, w, idx, p = res
  b, t = q.shape[:2]
  s = k.shape[1]
  bt = min(block_t, t)
  bidx = jnp.arange(b)[:, None, None]

  def step(dk, xs):
    qb, wb, ib, pb, dlb = xs
    valid = (ib >= 0) & (ib < s)
    ic = jnp.where(valid, ib, 0)
    rows = jax.vmap(lambda kk, ii: kk[ii])(k, ic).astype(jnp.float32)  # [B,bt,K,D]
    qf, wf = qb.astype(jnp.float32), wb.astype(jnp.float32)
    z = jnp.einsum("btjd,btkd->btjk", qf, rows)
    logits = jnp.einsum("btj,btjk->btk", wf, jax.nn.relu(z))
    logits = jnp.where(valid, logits, -jnp.inf)
    m = jnp.max(jnp.where(valid, logits, -1e30), axis=-1, keepdims=True)
    e = jnp.where(valid, jnp.exp(logits - m), 0.0)
    prob = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)
    pe = jnp.where(valid & (pb > 0), pb, 0.0).astype(jnp.float32)
    g = (prob * jnp.sum(pe, axis=-1, keepdims=True) - pe) * dlb[..., None]
    g = jnp.where(valid, g, 0.0)
    dw = jnp.einsum("btk,btjk->btj", g, jax.nn.relu(z))
    mz = jnp.where(z > 0, wf[..., None] * g[:, :, None, :], 0.0)  # [B,bt,J,K]
    dq = jnp.einsum("btjk,btkd->btjd", mz, rows)
    dkr = jnp.einsum("btjk,btjd->btkd", mz, qf)
    dk = dk.at[bidx, ic].add(jnp.where(valid[..., None], dkr, 0.0))
    return dk, (dq, dw)

  xs = [
    _blocks(q, bt),
    _blocks(w, bt),
    _blocks(_common.pad_axis(idx, 1, bt, value=-1), bt),
    _blocks(p, bt),
    _blocks(dl, bt),
  ]
  dk, (dq, dw) = jax.lax.scan(step, jnp.zeros(k.shape, jnp.float32), xs)
  dq, dw = _unblocks(dq, t), _unblocks(dw, t)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dw.astype(w.dtype), None, None)


sparse_kl.defvjp(_sparse_fwd, _sparse_bwd)


# ---------------------------------------------------------------------------------------------
# dense warm-up: KL over all causal keys, target rebuilt from the main attention
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def dense_kl(q, k, w, attn_q, attn_kv, attn_lse, attn_scale, block_t=256, block_s=2048):
  """Warm-up KL per query [B,T] (reference forward, streamed backward)."""
  return ref.dense_kl_reference(
    q, k, w, attn_q, attn_kv, attn_lse, attn_scale=attn_scale, block_t=block_t, block_s=block_s
  )


def _dense_fwd(q, k, w, attn_q, attn_kv, attn_lse, attn_scale, block_t, block_s):
  out = dense_kl(q, k, w, attn_q, attn_kv, attn_lse, attn_scale, block_t, block_s)
  return out, (q, k, w, attn_q, attn_kv, attn_lse)


def _dense_bwd(attn_scale, block_t, block_s, res, dl):
  q, k, w, attn_q, attn_kv, attn_lse = res
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  bt, bs = min(block_t, t), min(block_s, s)
  kb = _blocks(k, bs)  # [nk, B, bs, D]
  akvb = _blocks(attn_kv, bs)
  nk = kb.shape[0]
  off = s - t

  def query_block(dk, xs):
    qb, wb, aqb, alb, dlb, t0 = xs
    qf, wf = qb.astype(jnp.float32), wb.astype(jnp.float32)
    qpos = off + t0 + jnp.arange(bt)  # [bt]

    def tiles(j, kk, akv):
      kpos = j * bs + jnp.arange(bs)
      vis = (kpos[None, :] <= qpos[:, None]) & (kpos < s)[None, :]  # [bt, bs]
      z = jnp.einsum("btjd,bsd->btjs", qf, kk.astype(jnp.float32))
      logits = jnp.where(vis[None], jnp.einsum("btj,btjs->bts", wf, jax.nn.relu(z)), -jnp.inf)
      al = jnp.einsum("bthc,bsc->bths", aqb, akv, preferred_element_type=jnp.float32)
      a = jnp.where(vis[None, :, None, :], jnp.exp(al * attn_scale - alb[..., None]), 0.0)
      return z, logits, jnp.sum(a, axis=2), vis

    def sweep1(carry, xs2):  # online row max / sum-exp of I, and the target's row sum
      m, l, ps = carry
      j, kk, akv = xs2
      _, logits, pt, _ = tiles(j, kk, akv)
      m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      l = l * jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf)) + jnp.sum(
        jnp.exp(logits - m_safe[..., None]), axis=-1
      )
      return (m_new, l, ps + jnp.sum(pt, axis=-1)), None

    init = (jnp.full((b, bt), -jnp.inf), jnp.zeros((b, bt)), jnp.zeros((b, bt)))
    (m, l, ps), _ = jax.lax.scan(sweep1, init, (jnp.arange(nk), kb, akvb))
    lse = jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.maximum(l, 1e-30))
    pnorm = jnp.maximum(ps, 1e-30)
    psum = ps / pnorm  # Σ_s p over the row: 1, or 0 for an empty row

    def sweep2(carry, xs2):
      dq, dw = carry
      j, kk, akv = xs2
      z, logits, pt, vis = tiles(j, kk, akv)
      prob = jnp.where(vis[None], jnp.exp(logits - lse[..., None]), 0.0)
      pe = pt / pnorm[..., None]
      g = (prob * psum[..., None] - pe) * dlb[..., None]
      g = jnp.where(vis[None], g, 0.0)
      dw = dw + jnp.einsum("bts,btjs->btj", g, jax.nn.relu(z))
      mz = jnp.where(z > 0, wf[..., None] * g[:, :, None, :], 0.0)
      dq = dq + jnp.einsum("btjs,bsd->btjd", mz, kk.astype(jnp.float32))
      dkb = jnp.einsum("btjs,btjd->bsd", mz, qf)
      return (dq, dw), dkb

    (dq, dw), dkb = jax.lax.scan(
      sweep2, (jnp.zeros(qf.shape), jnp.zeros(wf.shape)), (jnp.arange(nk), kb, akvb)
    )
    return dk + dkb, (dq, dw)

  nq = -(-t // bt)
  xs = [_blocks(x, bt) for x in (q, w, attn_q, attn_lse, dl)] + [jnp.arange(nq) * bt]
  dk, (dq, dw) = jax.lax.scan(query_block, jnp.zeros((nk, b, bs, k.shape[-1]), jnp.float32), xs)
  dk = _unblocks(dk, s)
  dq, dw = _unblocks(dq, t), _unblocks(dw, t)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dw.astype(w.dtype), None, None, None)


dense_kl.defvjp(_dense_fwd, _dense_bwd)
