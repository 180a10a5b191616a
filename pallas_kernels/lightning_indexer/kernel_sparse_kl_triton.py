# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sparse-phase indexer KL as Pallas-Triton GPU kernels, forward and backward (math in grad.py).

The XLA version (grad.sparse_kl) gathers [block_t, k, D] key rows per query block in HBM and
scatter-adds [block_t, k, D] dk rows; here each token's selected rows are gathered straight into
registers chunk by chunk, and the backward stores its per-slot dk rows one token block at a
time.
Layout the wrapper hands to the kernels (batch folded into rows, as in sparse_mla/kernel_triton.py):
  q [N, Jp, Dp], w [N, Jp]  N = B·T tokens; J and D zero-padded to powers of 2 >= 16 (Triton
                            tiles; a zero head has w = 0 and adds nothing)
  k [R, Dp]                 R = B·S key rows
  idx [N, kp] int32         global row ids b·S + s, -1 for an invalid slot (id < 0 or >= S) and
                            for the padding up to kp = a multiple of block_k; ids may repeat
  p [N, kp] f32             the constant target (only slots with p > 0 and a valid id count)
kernels, grid (N,): one token x all J heads walks its slots in chunks of bk; per chunk it gathers
the chunk's rows, z = q_t·rowsᵀ [Jp, bk] on the tensor cores, I = Σ_j w_j·ReLU(z_j):
  fwd  online lse of I over the valid slots (m, l) and, per row, ps = Σ p, a = Σ p log p and
       c = Σ p (I - m) (shifted when m moves), so KL = a - c + ps·log l (0 for a row with
       ps = 0). Saves lse_I and ps per token.
  bwd  recomputes z and I per chunk, g = (exp(I - lse_I)·ps - p)·dl at valid slots, then
       dw[j] += Σ_s g·ReLU(z), dq += (g·w·1[z>0])·rows (dq [Jp, Dp] f32 in registers: the token
       is the program's own) and drows = (g·w·1[z>0])ᵀ·q_t [bk, Dp], stored in k's dtype at the
       slots' own rows of a per-slot buffer [N·kp, Dp].
dk: the rows a key gets from every token (and from repeated ids within a token) are summed
without atomics. The backward runs in token blocks (a scan, `_bwd_sorted`); per block the kernel
stores the per-slot rows, the block's ids are sorted by key and the Pallas-Triton segment sum
(sparse_mla/kernel_segment_sum_triton.py) adds each key's rows once into an f32 dk.
Chunks with no valid slot are branched around (rows early in the sequence, V4's few visible
entries); their per-slot rows stay unwritten, and their ids (-1) are never read by the segment
sum.
Dots take the inputs' dtype (bf16 on the tensor cores) with f32 accumulation; the g-weighted
operands are cast to the other operand's dtype (as kernel_kl_triton.py does).
On CPU the same kernels run under interpret=True (the Triton interpreter).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common
from pallas_kernels.sparse_mla import kernel_segment_sum_triton as seg

MAX_DIM = 256  # largest (padded) indexer head dim the register tiles take
MAX_HEADS = 128  # largest (padded) head count (dq [Jp, Dp] f32 lives in registers)
_NEG = -1e30


def _pow2(n: int) -> bool:
  return n > 0 and not n & (n - 1)


def _pad_pow2(n: int) -> int:
  return max(16, pl.next_power_of_2(n))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_k slots per chunk (a power of 2 >= 16); num_warps / num_stages: Triton's, for the
  forward; num_warps_bwd / num_stages_bwd for the backward (it holds dq [Jp, Dp] f32, z, the
  g-weighted tile and drows [bk, Dp] f32 at once)."""

  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2

  def __post_init__(self):
    if not _pow2(self.block_k) or self.block_k < 16:
      raise ValueError(f"block_k={self.block_k} must be a power of 2 >= 16")


def supported(q, k) -> str | None:
  """None when the kernels take these shapes, else why not."""
  j, d = q.shape[-2:]
  if _pad_pow2(d) > MAX_DIM:
    return f"indexer head dim D={d} > {MAX_DIM}"
  if _pad_pow2(j) > MAX_HEADS:
    return f"indexer heads J={j} > {MAX_HEADS}"
  for name, x in (("q", q), ("k", k)):
    if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize > 4:
      return f"{name} dtype {x.dtype} (need f32, bf16 or f16)"
  return None


# ---------------------------------------------------------------------------------------------
# tile helpers
# ---------------------------------------------------------------------------------------------


def _dot(a, b, ca, cb):
  """a·b contracting a's axis ca with b's axis cb, f32 accumulation (2-D operands)."""
  return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=jnp.float32)


def _any(valid):
  """Whether any slot of the chunk is valid (Triton lowers max, not reduce_or)."""
  return jnp.max(valid.astype(jnp.int32)) > 0


def _maybe(run, idx_ref, n, ci, bk, carry):
  """run(carry) for chunk ci, branched around when it has no valid slot."""
  ids = idx_ref[n, pl.ds(ci * bk, bk)]
  return jax.lax.cond(_any(ids >= 0), run, lambda x: x, carry)


def _chunk(idx_ref, k_ref, p_ref, qt, wt, n, ci, bk):
  """The chunk's validity [bk], gathered rows [bk, Dp], target [bk] (0 where it does not
  count), z [Jp, bk] f32 and I [bk] f32 (unmasked)."""
  ids = idx_ref[n, pl.ds(ci * bk, bk)]
  valid = ids >= 0
  safe = jnp.where(valid, ids, 0)
  rows = k_ref[safe, :]
  pc = p_ref[n, pl.ds(ci * bk, bk)]
  pc = jnp.where(valid & (pc > jnp.float32(0)), pc, jnp.float32(0))
  z = _dot(qt, rows, 1, 1)
  i = jnp.sum(wt[:, None] * jnp.maximum(z, jnp.float32(0)), axis=0)
  return valid, rows, pc, z, i


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, w_ref, idx_ref, p_ref, kl_ref, lse_ref, ps_ref, *, c):
  n, bk = pl.program_id(0), c["bk"]
  qt = q_ref[n, :, :]
  wt = w_ref[n, :].astype(jnp.float32)
  zero = jnp.float32(0)

  def body(ci, carry):
    def run(carry):
      m, l, ps, a, cc = carry
      valid, _, pc, _, i = _chunk(idx_ref, k_ref, p_ref, qt, wt, n, ci, bk)
      i = jnp.where(valid, i, _NEG)
      m_new = jnp.maximum(m, jnp.max(i))
      l = l * _common.exp(m - m_new) + jnp.sum(jnp.where(valid, _common.exp(i - m_new), zero))
      pos = pc > zero
      cc = cc - (m_new - m) * ps + jnp.sum(jnp.where(pos, pc * (i - m_new), zero))
      a = a + jnp.sum(jnp.where(pos, pc * _common.log(jnp.where(pos, pc, jnp.float32(1))), zero))
      return m_new, l, ps + jnp.sum(pc), a, cc

    return _maybe(run, idx_ref, n, ci, bk, carry)

  init = (jnp.float32(_NEG), zero, zero, zero, zero)
  m, l, ps, a, cc = jax.lax.fori_loop(0, c["nk"], body, init)
  live = l > zero
  logl = _common.log(jnp.where(live, l, jnp.float32(1)))
  kl_ref[n] = jnp.where(ps > zero, a - cc + ps * logl, zero)
  lse_ref[n] = jnp.where(live, m + logl, zero)
  ps_ref[n] = ps


def _bwd_kernel(
  q_ref, k_ref, w_ref, idx_ref, p_ref, lse_ref, ps_ref, dl_ref, dq_ref, dw_ref, dr_ref, *, c
):
  # dr [N * kp, Dp]: the per-slot rows (a skipped chunk's stay unwritten: its ids are -1, which
  # the segment sum never reads)
  n, bk = pl.program_id(0), c["bk"]
  qt = q_ref[n, :, :]
  wt = w_ref[n, :].astype(jnp.float32)
  lse, ps, dl = lse_ref[n], ps_ref[n], dl_ref[n]
  zero = jnp.float32(0)

  def body(ci, carry):
    def run(carry):
      dq, dw = carry
      valid, rows, pc, z, i = _chunk(idx_ref, k_ref, p_ref, qt, wt, n, ci, bk)
      prob = _common.exp(jnp.where(valid, i - lse, _NEG))
      g = jnp.where(valid, (prob * ps - pc) * dl, zero)  # [bk]
      dw = dw + jnp.sum(g[None, :] * jnp.maximum(z, zero), axis=1)
      gz = jnp.where(z > zero, wt[:, None] * g[None, :], zero)  # [Jp, bk]
      dq = dq + _dot(gz.astype(rows.dtype), rows, 1, 0)
      drows = _dot(gz.astype(qt.dtype), qt, 0, 0)  # [bk, Dp]
      dr_ref[pl.ds((n * c["nk"] + ci) * bk, bk), :] = drows.astype(dr_ref.dtype)
      return dq, dw

    return _maybe(run, idx_ref, n, ci, bk, carry)

  init = (jnp.zeros(qt.shape, jnp.float32), jnp.zeros(wt.shape, jnp.float32))
  dq, dw = jax.lax.fori_loop(0, c["nk"], body, init)
  dq_ref[n, :, :] = dq.astype(dq_ref.dtype)
  dw_ref[n, :] = dw


# ---------------------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------------------


def _prepare(q, k, w, idx, p, bsz: BlockSizes):
  """Kernel-layout operands (module docstring) and the static config."""
  b, t, nj, d = q.shape
  s = k.shape[1]
  jp, dp = _pad_pow2(nj), _pad_pow2(d)
  qp = _common.pad_axis(_common.pad_axis(q, 3, dp), 2, jp).reshape(b * t, jp, dp)
  kp = _common.pad_axis(k, 2, dp).reshape(b * s, dp)
  wp = _common.pad_axis(w, 2, jp).reshape(b * t, jp)
  valid = (idx >= 0) & (idx < s)
  gid = jnp.where(valid, idx + (jnp.arange(b, dtype=jnp.int32) * s)[:, None, None], -1)
  gid = _common.pad_axis(gid.astype(jnp.int32), 2, bsz.block_k, value=-1)
  pp = _common.pad_axis(p.astype(jnp.float32), 2, bsz.block_k)
  kk = gid.shape[-1]
  cfg = dict(bk=bsz.block_k, nk=kk // bsz.block_k)
  return qp, kp, wp, gid.reshape(b * t, kk), pp.reshape(b * t, kk), cfg


def _call(kernel, name, out_shape, args, n, bsz, interpret, bwd=False):
  warps = bsz.num_warps_bwd if bwd else bsz.num_warps
  stages = bsz.num_stages_bwd if bwd else bsz.num_stages
  return pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=(n,),
    compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages),
    interpret=interpret,
    name=name,
  )(*args)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def sparse_kl_fwd(q, k, w, idx, p, *, block_sizes, interpret=False):
  """(kl [B,T] f32, residuals (lse_I [N], ps [N])); q [B,T,J,D], k [B,S,D], w [B,T,J],
  idx [B,T,k] int32 (-1 or >= S: invalid), p [B,T,k] (see reference.sparse_kl_reference)."""
  b, t = q.shape[:2]
  qp, kp, wp, gid, pp, cfg = _prepare(q, k, w, idx, p, block_sizes)
  row = jax.ShapeDtypeStruct((b * t,), jnp.float32)
  kl, lse, ps = _call(
    functools.partial(_fwd_kernel, c=cfg),
    "sparse_kl_fwd",
    (row, row, row),
    (qp, kp, wp, gid, pp),
    b * t,
    block_sizes,
    interpret,
  )
  return kl.reshape(b, t), (lse, ps)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def sparse_kl_bwd(q, k, w, idx, p, res, dl, *, block_sizes, interpret=False):
  """(dq, dk, dw) of Σ_t dl[t]·kl[t], from sparse_kl_fwd's residuals; in q's, k's, w's dtypes."""
  b, t, nj, d = q.shape
  s = k.shape[1]
  lse, ps = res
  qp, kp, wp, gid, pp, cfg = _prepare(q, k, w, idx, p, block_sizes)
  dl = dl.astype(jnp.float32).reshape(b * t)
  dq, dw, dk = _bwd_sorted(qp, kp, wp, gid, pp, lse, ps, dl, cfg, block_sizes, interpret)
  dq = dq.reshape(b, t, *qp.shape[1:])[:, :, :nj, :d]
  dk = dk.reshape(b, s, -1)[..., :d].astype(k.dtype)
  dw = dw.reshape(b, t, -1)[..., :nj].astype(w.dtype)
  return dq, dk, dw


def _bwd_sorted(qp, kp, wp, gid, pp, lse, ps, dl, cfg, bsz, interpret):
  """Token blocks (scan); per block the kernel writes dq, dw and the per-slot rows, the block's
  ids are sorted by key and the segment sum adds each key's rows into dk (f32)."""
  n, kk = gid.shape
  nb = seg.block_tokens(n, kk * kp.shape[1])
  n_blocks = -(-n // nb)

  def split(x, fill=0):
    x = _common.pad_axis(x, 0, nb, value=fill)
    return x.reshape((n_blocks, nb) + x.shape[1:])

  def body(dk, blk):
    qb, wb, ib, pb, lb, sb, db = blk
    dq, dw, dr = _call(
      functools.partial(_bwd_kernel, c=cfg),
      "sparse_kl_bwd",
      (
        jax.ShapeDtypeStruct(qb.shape, qb.dtype),
        jax.ShapeDtypeStruct(wb.shape, jnp.float32),
        jax.ShapeDtypeStruct((nb * kk, kp.shape[1]), kp.dtype),
      ),
      (qb, kp, wb, ib, pb, lb, sb, db),
      nb,
      bsz,
      interpret,
      bwd=True,
    )
    order, starts = seg.sort_segments(ib.reshape(-1), kp.shape[0])
    dk = seg.segment_sum_rows(dr, order, starts, dk, interpret=bool(interpret))
    return dk, (dq, dw)

  xs = (split(qp), split(wp), split(gid, -1), split(pp), split(lse), split(ps), split(dl))
  dk, (dq, dw) = jax.lax.scan(body, jnp.zeros(kp.shape, jnp.float32), xs)
  dq = dq.reshape((n_blocks * nb,) + dq.shape[2:])[:n]
  dw = dw.reshape((n_blocks * nb,) + dw.shape[2:])[:n]
  return dq, dw, dk


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def sparse_kl(q, k, w, idx, p, block_sizes, interpret=False):
  """Sparse-phase KL per query [B,T] f32, differentiable in q, k, w (idx, p are constants)."""
  idx, p = jax.lax.stop_gradient((idx, p))
  kl, _ = sparse_kl_fwd(q, k, w, idx, p, block_sizes=block_sizes, interpret=interpret)
  return kl


def _vjp_fwd(q, k, w, idx, p, block_sizes, interpret):
  idx, p = jax.lax.stop_gradient((idx, p))
  kl, res = sparse_kl_fwd(q, k, w, idx, p, block_sizes=block_sizes, interpret=interpret)
  return kl, (q, k, w, idx, p, _common.saved(res))


def _vjp_bwd(block_sizes, interpret, saved, dl):
  q, k, w, idx, p, res = saved
  dq, dk, dw = sparse_kl_bwd(q, k, w, idx, p, res, dl, block_sizes=block_sizes, interpret=interpret)
  return dq, dk, dw, None, None


sparse_kl.defvjp(_vjp_fwd, _vjp_bwd)
