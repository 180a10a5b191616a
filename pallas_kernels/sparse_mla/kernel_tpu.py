# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Pallas TPU (Mosaic) sparse MLA forward and backward: scalar-prefetched indices, manual row DMAs.

Layout (docs/architecture.md §Kernels). Batch is folded into rows: N = B·T query tokens, kv [B·S,
Kp] with the row dim padded 576 -> Kp = 640 (a multiple of 128 lanes), heads padded to Hp (multiple
of 16), and each token's k slots padded to kp = n_chunks·block_k with -1. One grid step owns one
query token and all its heads (the [Hp, Kp] q tile is the MXU's M side, as in FlashMLA's
one-token-per-CTA plan):

  for chunk c of block_k slots (double buffered: chunk c+1's rows are in flight while c computes):
    rows[block_k, Kp] <- block_k single-row DMAs kv_hbm[idx[t, slot]] (invalid slots fetch row 0)
    s = scale · q·rowsᵀ   [Hp, block_k] f32, -inf at invalid slots
    online softmax (m, l in VMEM, lane-broadcast to 128), acc += p·rows[:, :Vp]

A token runs only its chunks up to its last valid slot (`_common.live_chunks`, scalar-prefetched
with the indices): top-k leaves the unused slots of a causal prefix at the end of the row, and the
chunks after the last valid one would only gather and mask.

The indices live in SMEM through `PrefetchScalarGridSpec` (the DMA addresses must be scalars). SMEM
is 1 MiB per core, so a call takes `tokens_per_call` tokens (32 x 2048 slots x 4 B = 256 KiB) and the
wrapper scans over token chunks; a VMEM copy of the same indices gives the per-slot validity vector.
kv stays in HBM (`memory_space=pl.ANY`).

Backward (one kernel, same gather): with P = exp(s - lse), dS = P ⊙ (dO·Vᵀ - Δ + dlse),
  dq = scale·dS·rows (accumulated over chunks in VMEM),
  drows = scale·dSᵀ·q (+ Pᵀ·dO on the first Vp dims), per slot, written to HBM by async DMA.
TPU DMAs have no add/atomic mode, so the per-slot drows of a token chunk are
summed into an f32 dkv by an XLA scatter-add in the wrapper (duplicates across and within tokens
add up; invalid slots drop). That costs one f32 [tokens, kp, Kp] write+read per chunk.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common

LANES = 128


def _round_up(x, m):
  return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_k: slots gathered per chunk (multiple of 128 lanes: the logits tile is [Hp, block_k]);
  tokens_per_call: query tokens per pallas_call (their indices must fit in SMEM)."""

  block_k: int = 128
  tokens_per_call: int = 32

  def __post_init__(self):
    if self.block_k <= 0 or self.block_k % LANES:
      raise ValueError(f"block_k={self.block_k} must be a positive multiple of {LANES}")
    if self.tokens_per_call <= 0:
      raise ValueError(f"tokens_per_call={self.tokens_per_call} must be positive")

  def smem_bytes(self, k: int) -> int:
    return self.tokens_per_call * _round_up(k, self.block_k) * 4

  @staticmethod
  def default_for(k: int) -> "BlockSizes":
    bk = 256 if k >= 1024 else 128  # 256 fills v6e/v7's 256-wide MXU; 128 is v5p's width
    # keep the scalar-prefetched indices at <= 256 KiB of the 1 MiB SMEM
    tpc = max(1, min(32, (256 * 1024) // (4 * _round_up(k, bk))))
    return BlockSizes(block_k=bk, tokens_per_call=tpc)


def _gather(idx_sref, kv_hbm, buf, sem, *, tok, chunk, slot, bk, kp):
  """Starts bk single-row DMAs kv_hbm[idx[tok, chunk·bk + r]] -> buf[slot, r] on sem[slot]."""
  base = tok * kp + chunk * bk

  def one(r, carry):
    row = idx_sref[base + r]
    pltpu.make_async_copy(kv_hbm.at[pl.ds(row, 1)], buf.at[slot, pl.ds(r, 1)], sem.at[slot]).start()
    return carry

  jax.lax.fori_loop(0, bk, one, 0)


def _wait_rows(kv_hbm, buf, sem, *, slot, bk):
  """Waits for the bk single-row copies into buf[slot].

  A DMA wait consumes the byte count of the copy it describes, so one wait described as the whole
  [bk, Kp] slot covers the bk row copies signalled on the same semaphore (the TPU interpreter
  models it so; it saves bk-1 waits per chunk).
  """
  del bk
  del kv_hbm
  pltpu.make_async_copy(buf.at[slot], buf.at[slot], sem.at[slot]).wait()


def _fwd_kernel(
  idx_sref,  # SMEM [tc·kp] int32: global kv row per slot (0 for invalid slots)
  live_sref,  # SMEM [tc] int32: chunks to run per token (_common.live_chunks)
  q_ref,  # VMEM [1, Hp, Kp]
  valid_ref,  # VMEM [1, 1, kp] int32: 1 where the slot is valid
  kv_hbm,  # HBM [B·S, Kp]
  o_ref,  # VMEM [1, Hp, Vp]
  lse_ref,  # VMEM [1, Hp, 128] f32 (lane-broadcast)
  buf,  # VMEM [2, bk, Kp]
  sem,  # DMA semaphores (2,)
  m_ref,  # VMEM [Hp, 128] f32
  l_ref,  # VMEM [Hp, 128] f32
  acc_ref,  # VMEM [Hp, Vp] f32
  *,
  scale,
  bk,
  kp,
  vp,
):
  tok = pl.program_id(0)
  n_live = live_sref[tok]  # >= 1: the chunks after hold only invalid slots
  m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
  gather = functools.partial(_gather, idx_sref, kv_hbm, buf, sem, tok=tok, bk=bk, kp=kp)
  gather(chunk=0, slot=0)
  q = q_ref[0]

  def step(c, carry):
    slot = jax.lax.rem(c, 2)

    @pl.when(c + 1 < n_live)
    def _():
      gather(chunk=c + 1, slot=1 - slot)

    _wait_rows(kv_hbm, buf, sem, slot=slot, bk=bk)
    rows = buf[slot]  # [bk, Kp]
    valid = valid_ref[0, :, pl.ds(pl.multiple_of(c * bk, bk), bk)] > 0  # [1, bk]
    s = jax.lax.dot_general(q, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = jnp.where(valid, s * scale, -jnp.inf)  # [Hp, bk]
    m_prev = m_ref[...]  # [Hp, 128]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_prev - m_safe)  # 0 while nothing was valid
    p = jnp.exp(s - m_safe[:, :1])
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_new
    pv = jnp.dot(p.astype(rows.dtype), rows[:, :vp], preferred_element_type=jnp.float32)
    acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv
    return carry

  jax.lax.fori_loop(0, n_live, step, 0)
  l = l_ref[...]
  ok = l > 0
  l_safe = jnp.where(ok, l, 1.0)
  o_ref[0] = (acc_ref[...] / l_safe[:, :1]).astype(o_ref.dtype)  # acc is 0 where l is 0
  lse_ref[0] = jnp.where(ok, m_ref[...] + jnp.log(l_safe), jnp.inf)


def _bwd_kernel(
  idx_sref,  # SMEM [tc·kp] int32
  live_sref,  # SMEM [tc] int32: chunks to run per token
  q_ref,  # VMEM [1, Hp, Kp]
  valid_ref,  # VMEM [1, 1, kp] int32
  do_ref,  # VMEM [1, Hp, Vp]
  lse_ref,  # VMEM [1, Hp, 128] f32
  c_ref,  # VMEM [1, Hp, 128] f32: Δ - dlse
  kv_hbm,  # HBM [B·S, Kp]
  dq_ref,  # VMEM [1, Hp, Kp]
  drows_hbm,  # HBM [tc·kp, Kp] f32 (per-slot kv cotangents; skipped chunks left unwritten)
  buf,  # VMEM [2, bk, Kp]
  sem,  # DMA (2,)
  dr_buf,  # VMEM [2, bk, Kp] f32 staging for the drows write-back
  wsem,  # DMA (2,)
  dq_acc,  # VMEM [Hp, Kp] f32
  *,
  scale,
  bk,
  kp,
  vp,
):
  tok = pl.program_id(0)
  n_live = live_sref[tok]
  dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
  gather = functools.partial(_gather, idx_sref, kv_hbm, buf, sem, tok=tok, bk=bk, kp=kp)
  gather(chunk=0, slot=0)
  q = q_ref[0]
  do = do_ref[0]
  lse = lse_ref[0][:, :1]  # [Hp, 1]
  cc = c_ref[0][:, :1]

  def write_desc(c, slot):
    dst = drows_hbm.at[pl.ds(tok * kp + c * bk, bk)]
    return pltpu.make_async_copy(dr_buf.at[slot], dst, wsem.at[slot])

  def step(c, carry):
    slot = jax.lax.rem(c, 2)

    @pl.when(c + 1 < n_live)
    def _():
      gather(chunk=c + 1, slot=1 - slot)

    _wait_rows(kv_hbm, buf, sem, slot=slot, bk=bk)
    rows = buf[slot]
    valid = valid_ref[0, :, pl.ds(pl.multiple_of(c * bk, bk), bk)] > 0
    s = jax.lax.dot_general(q, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    p = jnp.where(valid, jnp.exp(s * scale - lse), 0.0)  # [Hp, bk]
    dp = jax.lax.dot_general(
      do, rows[:, :vp], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    ds = p * (dp - cc)
    dq_acc[...] += jnp.dot(ds.astype(rows.dtype), rows, preferred_element_type=jnp.float32)
    dk = scale * jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)  # [bk, Kp]
    dv = jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)  # [bk, Vp]

    @pl.when(c >= 2)  # the write-back issued from this slot two chunks ago must have landed
    def _():
      write_desc(c - 2, slot).wait()

    dr_buf[slot] = dk
    dr_buf[slot, :, :vp] = dk[:, :vp] + dv
    write_desc(c, slot).start()
    return carry

  jax.lax.fori_loop(0, n_live, step, 0)
  for back in (2, 1):  # drain the outstanding write-backs (chunks n_live - 2, n_live - 1)
    c = n_live - back

    @pl.when(c >= 0)
    def _(c=c):
      write_desc(c, jax.lax.rem(c, 2)).wait()

  dq_ref[0] = (scale * dq_acc[...]).astype(dq_ref.dtype)


def _compiler_params():
  return pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=48 * 1024 * 1024)


def fwd_call(q, kv, idx_dma, live, valid, *, scale, vp, bs: BlockSizes, interpret=False):
  """One token chunk: q [tc,Hp,Kp], kv [R,Kp], idx_dma [tc·kp] (>= 0), live [tc] int32 (chunks
  to run, _common.live_chunks), valid [tc,1,kp] int32 -> out [tc,Hp,Vp] (q.dtype), lse
  [tc,Hp,128] f32."""
  tc, hp, kdim = q.shape
  kp = valid.shape[-1]
  bk = bs.block_k
  kern = functools.partial(_fwd_kernel, scale=scale, bk=bk, kp=kp, vp=vp)
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(tc,),
    in_specs=[
      pl.BlockSpec((1, hp, kdim), lambda i, *_: (i, 0, 0)),
      pl.BlockSpec((1, 1, kp), lambda i, *_: (i, 0, 0)),
      pl.BlockSpec(memory_space=pl.ANY),
    ],
    out_specs=[
      pl.BlockSpec((1, hp, vp), lambda i, *_: (i, 0, 0)),
      pl.BlockSpec((1, hp, LANES), lambda i, *_: (i, 0, 0)),
    ],
    scratch_shapes=[
      pltpu.VMEM((2, bk, kdim), kv.dtype),
      pltpu.SemaphoreType.DMA((2,)),
      pltpu.VMEM((hp, LANES), jnp.float32),
      pltpu.VMEM((hp, LANES), jnp.float32),
      pltpu.VMEM((hp, vp), jnp.float32),
    ],
  )
  flops = 2 * tc * hp * kp * (kdim + vp)
  bytes_ = tc * kp * kdim * kv.dtype.itemsize + q.size * q.dtype.itemsize
  return pl.pallas_call(
    kern,
    grid_spec=grid_spec,
    out_shape=[
      jax.ShapeDtypeStruct((tc, hp, vp), q.dtype),
      jax.ShapeDtypeStruct((tc, hp, LANES), jnp.float32),
    ],
    compiler_params=_compiler_params(),
    cost_estimate=pl.CostEstimate(flops=flops, transcendentals=tc * hp * kp, bytes_accessed=bytes_),
    interpret=interpret,
    name="sparse_mla_fwd_tpu",
  )(idx_dma, live, q, valid, kv)


def bwd_call(
  q, kv, idx_dma, live, valid, do, lse, cterm, *, scale, bs: BlockSizes, interpret=False
):
  """One token chunk: -> dq [tc,Hp,Kp] (q.dtype), drows [tc·kp, Kp] f32 (the rows of chunks past
  a token's live ones are not written: their slots are invalid and the caller drops them)."""
  tc, hp, kdim = q.shape
  vp = do.shape[-1]
  kp = valid.shape[-1]
  bk = bs.block_k
  kern = functools.partial(_bwd_kernel, scale=scale, bk=bk, kp=kp, vp=vp)
  tok_spec = lambda d: pl.BlockSpec((1, hp, d), lambda i, *_: (i, 0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(tc,),
    in_specs=[
      tok_spec(kdim),
      pl.BlockSpec((1, 1, kp), lambda i, *_: (i, 0, 0)),
      tok_spec(vp),
      tok_spec(LANES),
      tok_spec(LANES),
      pl.BlockSpec(memory_space=pl.ANY),
    ],
    out_specs=[tok_spec(kdim), pl.BlockSpec(memory_space=pl.ANY)],
    scratch_shapes=[
      pltpu.VMEM((2, bk, kdim), kv.dtype),
      pltpu.SemaphoreType.DMA((2,)),
      pltpu.VMEM((2, bk, kdim), jnp.float32),
      pltpu.SemaphoreType.DMA((2,)),
      pltpu.VMEM((hp, kdim), jnp.float32),
    ],
  )
  flops = 2 * tc * hp * kp * (3 * kdim + 2 * vp)
  bytes_ = tc * kp * kdim * (kv.dtype.itemsize + 4)
  return pl.pallas_call(
    kern,
    grid_spec=grid_spec,
    out_shape=[
      jax.ShapeDtypeStruct((tc, hp, kdim), q.dtype),
      jax.ShapeDtypeStruct((tc * kp, kdim), jnp.float32),
    ],
    compiler_params=_compiler_params(),
    cost_estimate=pl.CostEstimate(flops=flops, transcendentals=tc * hp * kp, bytes_accessed=bytes_),
    interpret=interpret,
    name="sparse_mla_bwd_tpu",
  )(idx_dma, live, q, valid, do, lse, cterm, kv)


# ---------------------------------------------------------------------------------------------
# Wrappers: padding, batch folding, token chunking, custom VJP.


@dataclasses.dataclass(frozen=True)
class _Prep:
  """Padded/folded operands shared by forward and backward."""

  n: int  # B·T tokens
  n_calls: int
  hp: int
  kdim: int  # Kp
  vp: int
  kp: int


def _prep(q, kv, idx, d_v, bs: BlockSizes):
  b, t, h, k_dim = q.shape
  s = kv.shape[1]
  kdim = _round_up(k_dim, LANES)
  hp = _round_up(h, 16)
  vp = _round_up(d_v, LANES)
  kp = _round_up(idx.shape[-1], bs.block_k)
  n = b * t
  tc = _tokens_per_call(n, bs)
  n_calls = -(-n // tc)
  npad = n_calls * tc
  qf = jnp.pad(q, ((0, 0), (0, 0), (0, hp - h), (0, kdim - k_dim))).reshape(n, hp, kdim)
  qf = jnp.pad(qf, ((0, npad - n), (0, 0), (0, 0)))
  kvf = jnp.pad(kv, ((0, 0), (0, 0), (0, kdim - k_dim))).reshape(b * s, kdim)
  valid = (idx >= 0) & (idx < s)
  gidx = jnp.where(valid, idx + (jnp.arange(b, dtype=jnp.int32) * s)[:, None, None], -1)
  gidx = jnp.pad(gidx.reshape(n, -1), ((0, npad - n), (0, kp - idx.shape[-1])), constant_values=-1)
  validf = (gidx >= 0).astype(jnp.int32)[:, None, :]  # [npad, 1, kp]
  idx_dma = jnp.maximum(gidx, 0)  # invalid slots fetch row 0 (finite, then masked)
  live = _common.live_chunks(gidx, bs.block_k)  # [npad]
  return qf, kvf, gidx, idx_dma, live, validf, _Prep(n, n_calls, hp, kdim, vp, kp)


def _tokens_per_call(n, bs: BlockSizes):
  return min(n, bs.tokens_per_call)


def _chunks(x, n_calls):
  return x.reshape((n_calls, -1) + x.shape[1:])


def _map_calls(fn, n_calls, xs):
  """fn over token chunks (lax.map: one pallas_call per chunk of tokens_per_call tokens)."""
  if n_calls == 1:
    return fn(*[x[0] for x in xs])
  return jax.lax.map(lambda a: fn(*a), tuple(xs))


# Under jit so that a remat replay which does not need the forward's outputs drops the whole call
# (a bare pallas_call is never removed from a jaxpr: remat_policy="save_attention" would keep a
# dead second forward in the backward).
@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _fwd(q, kv, idx, scale, d_v, bs, interpret):
  b, t, h, _ = q.shape
  qf, kvf, _, idx_dma, live, validf, pp = _prep(q, kv, idx, d_v, bs)
  fn = lambda qc, ic, lc, vc: fwd_call(
    qc, kvf, ic.reshape(-1), lc, vc, scale=scale, vp=pp.vp, bs=bs, interpret=interpret
  )
  xs = [_chunks(x, pp.n_calls) for x in (qf, idx_dma, live, validf)]
  out, lse = _map_calls(fn, pp.n_calls, xs)
  out = out.reshape(-1, pp.hp, pp.vp)[: pp.n, :h, :d_v].reshape(b, t, h, d_v)
  lse = lse.reshape(-1, pp.hp, LANES)[: pp.n, :h, 0].reshape(b, t, h)
  return out, lse


def _bwd(q, kv, idx, out, lse, d_out, d_lse, scale, d_v, bs, interpret):
  b, t, h, k_dim = q.shape
  s = kv.shape[1]
  qf, kvf, gidx, idx_dma, live, validf, pp = _prep(q, kv, idx, d_v, bs)
  npad = pp.n_calls * _tokens_per_call(pp.n, bs)
  delta = jnp.einsum("bthv,bthv->bth", out.astype(jnp.float32), d_out.astype(jnp.float32))
  cterm = delta - jnp.where(jnp.isfinite(lse), d_lse, 0.0)

  def heads(x, fill):  # [B,T,H] -> [npad, Hp, 128] lane-broadcast
    x = jnp.pad(x.reshape(pp.n, h), ((0, npad - pp.n), (0, pp.hp - h)), constant_values=fill)
    return jnp.broadcast_to(x[..., None], (npad, pp.hp, LANES)).astype(jnp.float32)

  dof = jnp.pad(d_out, ((0, 0), (0, 0), (0, pp.hp - h), (0, pp.vp - d_v))).reshape(
    pp.n, pp.hp, pp.vp
  )
  dof = jnp.pad(dof, ((0, npad - pp.n), (0, 0), (0, 0)))
  lsef, cf = heads(lse, jnp.inf), heads(cterm, 0.0)

  def body(dkv, xs):
    qc, ic, nc, vc, gc, doc, lc, cc = xs
    dq, drows = bwd_call(
      qc, kvf, ic.reshape(-1), nc, vc, doc, lc, cc, scale=scale, bs=bs, interpret=interpret
    )
    tgt = jnp.where(gc >= 0, gc, kvf.shape[0]).reshape(-1)  # invalid -> out of range -> dropped
    dkv = dkv.at[tgt].add(drows, mode="drop")
    return dkv, dq

  xs = [_chunks(x, pp.n_calls) for x in (qf, idx_dma, live, validf, gidx, dof, lsef, cf)]
  dkv, dq = jax.lax.scan(body, jnp.zeros(kvf.shape, jnp.float32), tuple(xs))
  dq = dq.reshape(-1, pp.hp, pp.kdim)[: pp.n, :h, :k_dim].reshape(b, t, h, k_dim)
  dkv = dkv.reshape(b, s, pp.kdim)[..., :k_dim].astype(kv.dtype)
  return dq, dkv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def sparse_mla_tpu(q, kv, idx, scale, d_v, bs, interpret):
  """q [B,T,H,K], kv [B,S,K], idx [B,T,k] int32 -> out [B,T,H,V], lse [B,T,H] (see reference.py)."""
  return _fwd(q, kv, idx, scale, d_v, bs, interpret)


def _vjp_fwd(q, kv, idx, scale, d_v, bs, interpret):
  out, lse = _fwd(q, kv, idx, scale, d_v, bs, interpret)
  out, lse = _common.saved(out, _common.SAVED_OUT), _common.saved(lse)
  return (out, lse), (q, kv, idx, out, lse)


def _vjp_bwd(scale, d_v, bs, interpret, res, cts):
  q, kv, idx, out, lse = res
  d_out, d_lse = cts
  dq, dkv = _bwd(q, kv, idx, out, lse, d_out, d_lse, scale, d_v, bs, interpret)
  return dq, dkv, None


sparse_mla_tpu.defvjp(_vjp_fwd, _vjp_bwd)
