# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Indexer-loss KL ops with hand-written, streamed backward passes (docs/dsa.md §Training).

With P = softmax(I) over the row's valid keys, p the constant target and
  g[t,s] = dKL_t/dI[t,s] = P[t,s] · Σ_{s'} p[t,s'] - p[t,s]
(Σp = 1 for a normalised target), and z = q_j·k_s:
  dw[t,j] = Σ_s g · ReLU(z)        dq[t,j] = Σ_s g · w[t,j] · 1[z>0] · k_s
  dk[s]   = Σ_t Σ_j g · w[t,j] · 1[z>0] · q[t,j]   (scatter-add over the queries that use s)

sparse_kl: streamed over query blocks; dk is a scatter-add of [block_t, k, D] rows per block.
dense_kl: the forward keeps two numbers per query (the indexer logits' log-sum-exp and the
unnormalised target's row sum), so the backward streams over query blocks and inside each over
key blocks in one sweep; nothing [T,S]-sized exists; dk for a key block is the sum over the query
block. The target may come in MHA form (per-head keys), a third of the absorbed form's work.
Plain jnp (XLA). On one GPU, ops.dense_kl runs the Pallas-Triton kernels of kernel_kl_triton.py
instead (same math, tiles in registers); this version is their reference and the CPU / TPU /
multi-device fallback.
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
  """The KL plus two per-query residuals, so the backward needs one sweep over the keys: the
  row log-sum-exp of the indexer logits and the row sum of the unnormalised target."""
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  aq, akv, al = jax.lax.stop_gradient((attn_q, attn_kv, attn_lse))
  t_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))

  def fn(qb, wb, aqb, tb_idx, alb=None):
    visible = jnp.arange(s)[None, None, :] <= (s - t + tb_idx)[..., None]
    pt, alb = ref.dense_target_unnormalised(aqb, akv, alb, visible, attn_scale)
    ps = jnp.sum(pt, axis=-1)
    logits = jnp.where(visible, ref._logits_block(qb, k, wb, block_s), -jnp.inf)
    m = jnp.max(jnp.where(visible, logits, -1e30), axis=-1)
    lse = m + jnp.log(jnp.sum(jnp.where(visible, jnp.exp(logits - m[..., None]), 0.0), axis=-1))
    return ref._kl(pt / jnp.maximum(ps, 1e-30)[..., None], logits), lse, ps, alb

  xs = [q, w, aq, t_idx] + ([] if al is None else [al])
  kl, lse, ps, al = _common.map_query_blocks(fn, block_t, xs)
  al, lse, ps = _common.saved((al, lse, ps))
  return kl, (q, k, w, aq, akv, al, lse, ps)


def _dense_bwd(attn_scale, block_t, block_s, res, dl):
  q, k, w, attn_q, attn_kv, attn_lse, lse_i, ps = res
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  bt, bs = min(block_t, t), min(block_s, s)
  kb = _blocks(k, bs)  # [nk, B, bs, D]
  akvb = _blocks(attn_kv, bs)
  nk = kb.shape[0]
  off = s - t

  def query_block(dk, xs):
    qb, wb, aqb, alb, dlb, lb, psb, t0 = xs
    qf, wf = qb.astype(jnp.float32), wb.astype(jnp.float32)
    qpos = off + t0 + jnp.arange(bt)  # [bt]
    pnorm = jnp.maximum(psb, 1e-30)
    psum = psb / pnorm  # Σ_s p over the row: 1, or 0 for an empty row

    def sweep(carry, xs2):
      dq, dw = carry
      j, kk, akv = xs2
      kpos = j * bs + jnp.arange(bs)
      vis = (kpos[None, :] <= qpos[:, None]) & (kpos < s)[None, :]  # [bt, bs]
      z = jnp.einsum("btjd,bsd->btjs", qf, kk.astype(jnp.float32))
      logits = jnp.einsum("btj,btjs->bts", wf, jax.nn.relu(z))
      vis_b = jnp.broadcast_to(vis[None], logits.shape)
      pt, _ = ref.dense_target_unnormalised(aqb, akv, alb, vis_b, attn_scale)
      prob = jnp.where(vis[None], jnp.exp(logits - lb[..., None]), 0.0)
      g = (prob * psum[..., None] - pt / pnorm[..., None]) * dlb[..., None]
      g = jnp.where(vis[None], g, 0.0)
      dw = dw + jnp.einsum("bts,btjs->btj", g, jax.nn.relu(z))
      mz = jnp.where(z > 0, wf[..., None] * g[:, :, None, :], 0.0)
      dq = dq + jnp.einsum("btjs,bsd->btjd", mz, kk.astype(jnp.float32))
      dkb = jnp.einsum("btjs,btjd->bsd", mz, qf)
      return (dq, dw), dkb

    (dq, dw), dkb = jax.lax.scan(
      sweep, (jnp.zeros(qf.shape), jnp.zeros(wf.shape)), (jnp.arange(nk), kb, akvb)
    )
    return dk + dkb, (dq, dw)

  nq = -(-t // bt)
  xs = [_blocks(x, bt) for x in (q, w, attn_q, attn_lse, dl, lse_i, ps)]
  xs.append(jnp.arange(nq) * bt)
  dk, (dq, dw) = jax.lax.scan(query_block, jnp.zeros((nk, b, bs, k.shape[-1]), jnp.float32), xs)
  dk = _unblocks(dk, s)
  dq, dw = _unblocks(dq, t), _unblocks(dw, t)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dw.astype(w.dtype), None, None, None)


dense_kl.defvjp(_dense_fwd, _dense_bwd)
