# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Triton-backend Pallas sparse MLA kernels (forward and backward) over gathered top-k rows.

Layout the wrappers hand to the kernels (batch folded into rows, see ops.py):
  q   [N, Hp, D]   N = B*T query tokens, heads padded to a multiple of block_h, D = da + db
  kv  [R, D]       R = B*S latent rows
  idx [N, kp]      int32 global row numbers (b*S + s), -1 for an invalid slot, kp % block_k == 0

Triton needs power-of-2 tensors, so the feature dim is split into `da` (a power of 2 >= d_v: the
value dims, also the first part of the logits; 512 for V3.2) and `db` (a power of 2 or 0: the rest
of the logit dims, 64 rope dims for V3.2). The gather is pointer style: each 64-slot chunk loads
`kv[rows, cols]` with 16-byte vector loads from every thread, and Triton's software pipeliner
overlaps the next chunk's loads with this chunk's two matmuls and the online softmax.

One program = one token x block_h heads; all value dims are in one program, so each chunk's rows
are gathered once and q·kᵀ is computed once (no value-dim split).

Backward (one program = one token x block_h heads): recompute P from the saved lse, dP = dO·Vᵀ,
dS = P ⊙ (dP - Δ + dlse); dq accumulates in registers; each chunk's dkv rows (dSᵀ·q + Pᵀ·dO) are
added to an f32 dkv with atomics (duplicate slots and other tokens' slots add up; invalid slots
go to a dummy row R that the wrapper drops).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_h: heads per program (dot M); block_k: slots per chunk; Triton num_warps/num_stages."""

  block_h: int = 64
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_h", "block_k"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"{name}={v} must be a power of 2 >= 16")


@dataclasses.dataclass(frozen=True)
class BwdBlockSizes:
  """block_k: slots per chunk; col_block: columns per dkv atomic tile (bounds live registers)."""

  block_h: int = 64
  block_k: int = 64  # 32 needs 316 KiB of SMEM (mma.sync operand copies for M=32); 64 fits
  col_block: int = 128
  num_warps: int = 8
  num_stages: int = 1

  def __post_init__(self):
    for name in ("block_h", "block_k", "col_block"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise ValueError(f"{name}={v} must be a power of 2 >= 16")


def split_dims(k_dim: int, d_v: int) -> tuple[int, int]:
  """(da, db): da = next pow2 >= d_v (value dims first), db = pow2 covering the rest (or 0)."""
  da = 1 << max(4, (d_v - 1).bit_length())
  rest = k_dim - da
  db = 0 if rest <= 0 else 1 << max(4, (rest - 1).bit_length())
  return da, db


def _col_chunks(da, db, cw):
  """Static column chunks [(start, width)]: da split into widths <= cw, then the db part."""
  w = min(cw, da)
  chunks = [(c, w) for c in range(0, da, w)]
  if db:
    chunks.append((da, db))
  return chunks


def sparse_mla_fwd_triton(q, kv, idx, *, scale, da, db, bs: BlockSizes, interpret=False):
  """q [N,Hp,da+db], kv [R,da+db], idx [N,kp] -> out [N,Hp,da] (q.dtype), lse [N,Hp] f32."""
  n, hp, d = q.shape
  assert d == da + db and kv.shape[1] == d, (q.shape, kv.shape, da, db)
  kp = idx.shape[1]
  bh, bk = bs.block_h, bs.block_k
  assert hp % bh == 0 and kp % bk == 0, (hp, bh, kp, bk)
  n_chunks = kp // bk
  dtype = q.dtype
  qk_scale = scale * _LOG2E  # softmax in base 2

  def kernel(q_ref, kv_ref, idx_ref, o_ref, lse_ref):
    hb = pl.program_id(0)
    t = pl.program_id(1)
    heads = pl.ds(hb * bh, bh)
    qa = q_ref[t, heads, pl.ds(0, da)]
    qb = q_ref[t, heads, pl.ds(da, db)] if db else None

    def body(j, carry):
      acc, m_i, l_i = carry
      ids = idx_ref[t, pl.ds(j * bk, bk)]
      valid = ids >= 0
      rows = jnp.where(valid, ids, 0)
      ka = kv_ref[rows, pl.ds(0, da)]  # [bk, da] gathered rows (value dims first)
      s = pltriton.dot(qa, ka, trans_b=True)
      if db:
        s += pltriton.dot(qb, kv_ref[rows, pl.ds(da, db)], trans_b=True)
      s = jnp.where(valid[None, :], s * qk_scale, -jnp.inf)
      m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing valid yet: keep exp finite
      alpha = jnp.exp2(m_i - m_use)
      p = jnp.exp2(s - m_use[:, None])
      l_i = l_i * alpha + jnp.sum(p, axis=1)
      acc = acc * alpha[:, None] + pltriton.dot(p.astype(dtype), ka)
      return acc, m_new, l_i

    init = (
      jnp.zeros((bh, da), jnp.float32),
      jnp.full((bh,), -jnp.inf, jnp.float32),
      jnp.zeros((bh,), jnp.float32),
    )
    acc, m_i, l_i = jax.lax.fori_loop(0, n_chunks, body, init)
    has = l_i > 0
    l_safe = jnp.where(has, l_i, 1.0)
    o_ref[t, heads, :] = (acc * jnp.where(has, 1.0 / l_safe, 0.0)[:, None]).astype(dtype)
    lse_ref[t, heads] = jnp.where(has, m_i * _LN2 + jnp.log(l_safe), jnp.inf)

  return pl.pallas_call(
    kernel,
    out_shape=(
      jax.ShapeDtypeStruct((n, hp, da), dtype),
      jax.ShapeDtypeStruct((n, hp), jnp.float32),
    ),
    grid=(hp // bh, n),  # heads fastest: a token's programs run together and share rows in L2
    compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
    interpret=interpret,
    name="sparse_mla_fwd_triton",
  )(q, kv, idx)


def _atomic_add_rows(ref, rows, col0, val, interpret):
  """ref[rows[i], col0:col0+w] += val[i] for every i (rows may repeat)."""
  bk, w = val.shape
  if interpret:
    # The interpreter's atomic discharge rule keeps only one of repeated rows; programs run one
    # after another there, so a read-modify-write with a scatter-add is exact.
    cols = pl.ds(col0, w)
    ref[:, cols] = ref[:, cols].at[rows].add(val)
    return
  r2 = jax.lax.broadcast_in_dim(rows, (bk, w), (0,))
  c2 = col0 + jax.lax.broadcasted_iota(jnp.int32, (bk, w), 1)
  pltriton.atomic_add(ref, (r2, c2), val)


def sparse_mla_bwd_triton(
  q, kv, idx, d_out, lse, delta, d_lse, *, scale, da, db, bs: BwdBlockSizes, interpret=False
):
  """dq [N,Hp,D] (q.dtype), dkv [R,D] f32 from the saved lse (no softmax renormalisation).

  d_out [N,Hp,da] (zero beyond d_v), lse/delta/d_lse [N,Hp] f32 (d_lse zero where lse = inf).
  """
  n, hp, d = q.shape
  r = kv.shape[0]
  kp = idx.shape[1]
  bh, bk = bs.block_h, bs.block_k
  assert hp % bh == 0 and kp % bk == 0, (hp, bh, kp, bk)
  n_chunks = kp // bk
  dtype = q.dtype
  qk_scale = scale * _LOG2E
  chunks = _col_chunks(da, db, bs.col_block)
  v_chunks = [(c, w) for c, w in chunks if c < da]

  def kernel(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, dlse_ref, _, dq_ref, dkv_ref):
    hb = pl.program_id(0)
    t = pl.program_id(1)
    heads = pl.ds(hb * bh, bh)
    qs = [q_ref[t, heads, pl.ds(c, w)] for c, w in chunks]
    dos = [do_ref[t, heads, pl.ds(c, w)] for c, w in v_chunks]
    lse2 = lse_ref[t, heads] * _LOG2E
    shift = dlse_ref[t, heads] - delta_ref[t, heads]

    def body(j, dqs):
      ids = idx_ref[t, pl.ds(j * bk, bk)]
      valid = ids >= 0
      rows = jnp.where(valid, ids, 0)
      ks = [kv_ref[rows, pl.ds(c, w)] for c, w in chunks]
      s = functools.reduce(
        lambda a, b: a + b, [pltriton.dot(qc, kc, trans_b=True) for qc, kc in zip(qs, ks)]
      )
      p = jnp.where(valid[None, :], jnp.exp2(s * qk_scale - lse2[:, None]), 0.0)
      dp = functools.reduce(
        lambda a, b: a + b, [pltriton.dot(dc, kc, trans_b=True) for dc, kc in zip(dos, ks)]
      )
      ds = (p * (dp + shift[:, None]) * scale).astype(dtype)  # scale folded in
      pb = p.astype(dtype)
      dqs = tuple(acc + pltriton.dot(ds, kc) for acc, kc in zip(dqs, ks))
      dst_rows = jnp.where(valid, ids, r)  # invalid slots -> dummy row r
      for i, (c, w) in enumerate(chunks):
        g = pltriton.dot(ds, qs[i], trans_a=True)  # [bk, w]
        if c < da:
          g += pltriton.dot(pb, dos[i], trans_a=True)
        _atomic_add_rows(dkv_ref, dst_rows, c, g, interpret)
      return dqs

    init = tuple(jnp.zeros((bh, w), jnp.float32) for _, w in chunks)
    dqs = jax.lax.fori_loop(0, n_chunks, body, init)
    for (c, w), acc in zip(chunks, dqs):
      dq_ref[t, heads, pl.ds(c, w)] = acc.astype(dtype)

  dkv0 = jnp.zeros((r + 1, d), jnp.float32)
  dq, dkv = pl.pallas_call(
    kernel,
    out_shape=(
      jax.ShapeDtypeStruct((n, hp, d), dtype),
      jax.ShapeDtypeStruct((r + 1, d), jnp.float32),
    ),
    grid=(hp // bh, n),
    input_output_aliases={7: 1},
    compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
    interpret=interpret,
    name="sparse_mla_bwd_triton",
  )(q, kv, idx, d_out, lse, delta, d_lse, dkv0)
  return dq, dkv[:r]
