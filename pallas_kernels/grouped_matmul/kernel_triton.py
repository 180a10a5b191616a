# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Grouped matmul as Pallas-Triton GPU kernels, with its backward (the MoE experts' GEMMs).

gmm(lhs [M,K], rhs [E,K,N], group_sizes [E]) -> [M,N], rows sorted by group, like
`jax.lax.ragged_dot` (rows past Σ group_sizes come out zero). XLA's GPU lowering of ragged_dot
and of its transpose computes every expert over every row ([E,M,N] f32, E-fold FLOPs); these
kernels touch each row once per expert it belongs to, and nothing [E,M,*] is ever built.

Kernels (dots in the operands' dtype on the tensor cores, f32 accumulation; f32 operands use IEEE
f32 dots, not TF32, so that f32 matches ragged_dot at HIGHEST precision):
  gmm   grid (N tiles, work items). A work item is one [bm]-row tile of lhs paired with one group
        that has rows in it; the program loads its (tile, expert, row range) from a small int32
        table, loops over K in [bk] chunks (acc [bm,bn] f32 in registers, rhs[expert] tiles), and
        stores only the rows of its group (a masked store). N tiles vary fastest, so the
        programs that share a row tile run together and read it from L2.
  dlhs  the same kernel on (dout [M,N], rhs [E,K,N]) with rhs tiles loaded transposed
        (dout · rhs[e]ᵀ), so no rhsᵀ copy.
  tgmm  d_rhs[e] = lhs_eᵀ · dout_e: grid (N tiles, K tiles, E); each program loops over the
        [bm]-row tiles that hold rows of group e, loading them with row masks (rows of the
        neighbouring groups read as zero), acc [bk,bn] f32. An empty group writes zeros.

Why a work list with masked stores rather than padding each group to a multiple of bm: padding
would copy lhs ([M,K], 1.9 GB at the V3.2 layer's 131072 x 7168 bf16) into a padded layout and
the output back, per GEMM, forward and backward (about 15% of the GEMM time at HBM speed, plus
E·bm rows of extra memory). With the work list the only cost of a tile that straddles groups is
that it is computed once per group it holds: at most E extra tiles over cdiv(M, bm) (8 over
1024 at the V3.2 shape). Rows past Σ group_sizes (and the wrapper's padding to a multiple of
bm) form one more "group" whose work items run no K loop and store zeros, so every output row is
written exactly once and ragged_dot's zero rows come out without a zero-fill pass.

The wrapper pads M to bm and K, N to the tiles (Triton needs power-of-2 tiles, >= 16 for a dot)
with zeros only when they are not multiples already (no copy at the model's shapes), so every
load is in bounds (interpret mode clamps out-of-bounds slices instead of masking them).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common


def _pow2(n: int) -> bool:
  return n > 0 and not n & (n - 1)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles (powers of 2 >= 16). gmm / dlhs: block_m rows x block_n output columns, reduction in
  block_k chunks. tgmm: [tgmm_block_k, tgmm_block_n] of d_rhs per program, rows in tgmm_block_m
  steps. num_warps / num_stages: Triton's, for all three kernels."""

  block_m: int = 128
  block_k: int = 64
  block_n: int = 128
  tgmm_block_m: int = 64
  tgmm_block_k: int = 128
  tgmm_block_n: int = 128
  num_warps: int = 8
  num_stages: int = 3

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if f.name.startswith("num_"):
        continue
      v = getattr(self, f.name)
      if not _pow2(v) or v < 16:
        raise ValueError(f"{f.name}={v} must be a power of 2 >= 16")


def supported(lhs, rhs) -> str | None:
  """None when the kernels take these operands, else why not."""
  for name, x in (("lhs", lhs), ("rhs", rhs)):
    if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize > 4:
      return f"{name} dtype {x.dtype} (need f32, bf16 or f16)"
  return None


def _tile(block: int, dim: int) -> int:
  """The tile along a dim of size `dim`: `block`, or less for a small dim (>= 16, power of 2)."""
  return min(block, max(16, pl.next_power_of_2(dim)))


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, ca, cb, precision):
  """a·b contracting a's axis ca with b's axis cb, f32 accumulation (2-D operands)."""
  return jax.lax.dot_general(
    a, b, (((ca,), (cb,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
  )


def _group_bounds(group_sizes, m: int):
  """(starts, ends) [E] int32 of each group's rows, clamped to M (a group past row M is cut)."""
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def work_items(group_sizes, m: int, mp: int, bm: int):
  """The gmm work list, int32 [4, W]: rows (row tile, group, first row, end row) per item.

  Group E is the rows [Σ group_sizes, mp) (no expert: zeros). W = mp/bm + E is static: the E+1
  groups are contiguous, so they cover at most mp/bm + E (tile, group) pairs. Items past the
  last pair have an empty row range (they store nothing).
  """
  e = group_sizes.shape[0]
  starts, ends = _group_bounds(group_sizes, m)
  starts = jnp.concatenate([starts, ends[-1:]])
  ends = jnp.concatenate([ends, jnp.full((1,), mp, jnp.int32)])
  n_tiles = jnp.where(ends > starts, (ends - 1) // bm - starts // bm + 1, 0)
  cum = jnp.cumsum(n_tiles)
  w = jnp.arange(mp // bm + e, dtype=jnp.int32)
  g = jnp.minimum(jnp.searchsorted(cum, w, side="right"), e).astype(jnp.int32)
  tile = starts[g] // bm + w - (cum[g] - n_tiles[g])
  valid = w < cum[-1]
  lo = jnp.where(valid, jnp.maximum(starts[g], tile * bm), 0)
  hi = jnp.where(valid, jnp.minimum(ends[g], tile * bm + bm), 0)
  return jnp.stack([jnp.where(valid, tile, 0), g, lo, hi]).astype(jnp.int32)


def _gmm_kernel(meta_ref, lhs_ref, rhs_ref, o_ref, *, bm, bj, bc, nj, ne, trans, precision):
  """out[rows of the item's group, column tile] = lhs rows · rhs[e] (or · rhs[e]ᵀ if trans)."""
  c0 = pl.program_id(0) * bc
  w = pl.program_id(1)
  tile, g, lo, hi = meta_ref[0, w], meta_ref[1, w], meta_ref[2, w], meta_ref[3, w]
  r0 = pl.multiple_of(tile * bm, bm)
  e = jnp.minimum(g, ne - 1)
  # Group E (no expert) and idle items: no K loop, zeros. int32 constants, not Python ints: the
  # Triton lowering of select_n gives weak-typed literals the predicate's type (i1).
  steps = jnp.where((g < ne) & (hi > lo), jnp.int32(nj), jnp.int32(0))

  def body(j, acc):
    j0 = pl.multiple_of(j * bj, bj)
    a = lhs_ref[pl.ds(r0, bm), pl.ds(j0, bj)]
    if trans:
      return acc + _dot(a, rhs_ref[e, pl.ds(c0, bc), pl.ds(j0, bj)], 1, 1, precision)
    return acc + _dot(a, rhs_ref[e, pl.ds(j0, bj), pl.ds(c0, bc)], 1, 0, precision)

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bc), jnp.float32))
  rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bm, bc), 0)
  pltriton.store(
    o_ref.at[pl.ds(r0, bm), pl.ds(c0, bc)],
    acc.astype(o_ref.dtype),
    mask=(rows >= lo) & (rows < hi),
  )


def _tgmm_kernel(bounds_ref, lhs_ref, dout_ref, o_ref, *, bm, bk, bn, precision):
  """d_rhs[e, k tile, n tile] = Σ over group e's rows of lhs[row, k tile]ᵀ · dout[row, n tile]."""
  n0 = pl.program_id(0) * bn
  k0 = pl.program_id(1) * bk
  e = pl.program_id(2)
  start, end = bounds_ref[0, e], bounds_ref[1, e]
  t0 = start // bm
  t1 = jnp.where(end > start, (end + bm - 1) // bm, t0)

  def body(t, acc):
    r0 = pl.multiple_of(t * bm, bm)
    rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    inside = (rows >= start) & (rows < end)
    a = pltriton.load(
      lhs_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)],
      mask=jnp.broadcast_to(inside, (bm, bk)),
      other=0,
    )
    d = pltriton.load(
      dout_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)],
      mask=jnp.broadcast_to(inside, (bm, bn)),
      other=0,
    )
    return acc + _dot(a, d, 0, 0, precision)

  acc = jax.lax.fori_loop(t0, t1, body, jnp.zeros((bk, bn), jnp.float32))
  o_ref[e, pl.ds(k0, bk), pl.ds(n0, bn)] = acc.astype(o_ref.dtype)


def _params(bsz: BlockSizes):
  return pltriton.CompilerParams(num_warps=bsz.num_warps, num_stages=bsz.num_stages)


def gmm_call(lhs, rhs, group_sizes, *, out_dtype, block_sizes, interpret=False, trans=False):
  """[M,C] = lhs [M,J] · rhs[e] per group: rhs [E,J,C], or rhs [E,C,J] used transposed (trans).

  lhs and rhs share a dtype; group_sizes [E] int32.
  """
  bsz = block_sizes
  m, j = lhs.shape
  ne = rhs.shape[0]
  c = rhs.shape[1] if trans else rhs.shape[2]
  bm, bj, bc = bsz.block_m, _tile(bsz.block_k, j), _tile(bsz.block_n, c)
  lhs_p = _common.pad_axis(_common.pad_axis(lhs, 0, bm), 1, bj)
  rhs_p = _common.pad_axis(_common.pad_axis(rhs, 1, bc if trans else bj), 2, bj if trans else bc)
  mp, jp = lhs_p.shape
  cp = rhs_p.shape[1] if trans else rhs_p.shape[2]
  meta = work_items(group_sizes, m, mp, bm)
  kernel = functools.partial(
    _gmm_kernel,
    bm=bm,
    bj=bj,
    bc=bc,
    nj=jp // bj,
    ne=ne,
    trans=trans,
    precision=_precision(lhs.dtype),
  )
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((mp, cp), out_dtype),
    grid=(cp // bc, meta.shape[1]),
    compiler_params=_params(bsz),
    interpret=interpret,
    name="gmm_dlhs" if trans else "gmm",
  )(meta, lhs_p, rhs_p)
  return out[:m, :c]


def tgmm_call(lhs, dout, group_sizes, *, out_dtype, block_sizes, interpret=False):
  """d_rhs [E,K,N] = lhs_eᵀ · dout_e per group; lhs [M,K] and dout [M,N] share a dtype."""
  bsz = block_sizes
  m, k = lhs.shape
  n = dout.shape[1]
  ne = group_sizes.shape[0]
  bm, bk, bn = bsz.tgmm_block_m, _tile(bsz.tgmm_block_k, k), _tile(bsz.tgmm_block_n, n)
  lhs_p = _common.pad_axis(_common.pad_axis(lhs, 0, bm), 1, bk)
  dout_p = _common.pad_axis(_common.pad_axis(dout, 0, bm), 1, bn)
  kp, np_ = lhs_p.shape[1], dout_p.shape[1]
  bounds = jnp.stack(_group_bounds(group_sizes, m))
  kernel = functools.partial(_tgmm_kernel, bm=bm, bk=bk, bn=bn, precision=_precision(lhs.dtype))
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((ne, kp, np_), out_dtype),
    grid=(np_ // bn, kp // bk, ne),
    compiler_params=_params(bsz),
    interpret=interpret,
    name="tgmm",
  )(bounds, lhs_p, dout_p)
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def gmm(lhs, rhs, group_sizes, out_dtype, block_sizes, interpret=False):
  """[M,N] out_dtype = ragged_dot(lhs [M,K], rhs [E,K,N], group_sizes [E] int32), differentiable
  in lhs and rhs. lhs and rhs share a dtype (f32, bf16 or f16); out_dtype is a numpy dtype."""
  return gmm_call(
    lhs, rhs, group_sizes, out_dtype=out_dtype, block_sizes=block_sizes, interpret=interpret
  )


def _vjp_fwd(lhs, rhs, group_sizes, out_dtype, block_sizes, interpret):
  out = gmm(lhs, rhs, group_sizes, out_dtype, block_sizes, interpret)
  return out, (lhs, rhs, group_sizes)


def _vjp_bwd(out_dtype, block_sizes, interpret, res, dout):
  """d_lhs = dout · rhs[e]ᵀ (gmm, transposed loads), d_rhs = tgmm(lhs, dout). The f32
  cotangent is cast to the operands' dtype for the tensor cores (as flash attention casts P)."""
  del out_dtype
  lhs, rhs, group_sizes = res
  kw = dict(block_sizes=block_sizes, interpret=interpret)
  d_lhs = gmm_call(dout.astype(rhs.dtype), rhs, group_sizes, out_dtype=lhs.dtype, trans=True, **kw)
  d_rhs = tgmm_call(lhs, dout.astype(lhs.dtype), group_sizes, out_dtype=rhs.dtype, **kw)
  return d_lhs, d_rhs, None


gmm.defvjp(_vjp_fwd, _vjp_bwd)
