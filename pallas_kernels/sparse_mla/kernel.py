# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Mosaic GPU (Hopper) sparse MLA forward kernel over gathered top-k latent rows.

Layout the wrappers hand to the kernel (batch folded into rows, see `prepare`):
  q   [N, Hp, Kp]  N = B*T query tokens, heads padded to a multiple of 64, K padded to 64s
  kv  [R, Kp]      R = B*S latent rows
  idx [N, kp]      int32 global row numbers (b*S + s), -1 for an invalid slot, kp % block_k == 0

One CTA = one token x 64 heads x one slice of the value dims. Hopper has no TMA gather, so each
selected row is copied with its own one-row TMA into an untiled SMEM stage (a tiled destination is
rejected by the lowering), then re-laid out through registers into a tiled + swizzled buffer that
wgmma can read. The next chunk's row copies are issued as soon as the stage is drained, so they
overlap this chunk's two matmuls and the online softmax.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
HEAD_BLOCK = 64  # wgmma M


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_k: selected rows per chunk (wgmma N of q·kvᵀ, K of p·v); block_v: value dims per CTA."""

  block_k: int = 64
  block_v: int = 256
  # Profiling knobs (wrong results; timing breakdown only): one row copy per chunk instead of
  # block_k, or no wgmma/softmax (the relayout and copies stay).
  probe_one_copy: bool = False
  probe_no_math: bool = False

  def __post_init__(self):
    # 64: the untiled -> swizzled relayout needs the WGMMA register layout (rows % 64 == 0).
    if self.block_k != 64:
      raise ValueError(f"block_k={self.block_k} must be 64")
    if self.block_v % 64 or not 64 <= self.block_v <= 256:
      raise ValueError(f"block_v={self.block_v} must be a multiple of 64 in [64, 256]")

  @classmethod
  def default_for(cls, d_v: int) -> "BlockSizes":
    dv = -(-d_v // 64) * 64
    return cls(block_k=64, block_v=min(256, dv))


def _mma_acc(acc, a, b, interpret):
  """acc + a @ b with wgmma accumulating in place on hardware.

  The GPU interpreter cannot discharge run_state(ACC.init(...)), store into an accumulator or read
  a register operand, so there `a` goes through SMEM and a fresh product is added (same math; the
  extra SMEM and registers only exist on CPU).
  """
  if interpret:

    def scope(a_smem):
      a_smem[...] = a
      plgpu.commit_smem()

      def mm(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b)
        return acc_ref[...]

      return pl.run_scoped(mm, plgpu.ACC(acc.shape, jnp.float32))

    return acc + pl.run_scoped(scope, _swizzled(a.shape, a.dtype))

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)

  return pl.run_state(body)(plgpu.ACC.init(acc))


def _swizzled(shape, dtype):
  return plgpu.SMEM(
    shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  )


def sparse_mla_fwd_flat(q, kv, idx, *, scale: float, n_v: int, bs: BlockSizes, interpret=False):
  """Flat-layout forward: q [N,Hp,Kp], kv [R,Kp], idx [N,kp] -> out [N,Hp,n_v*bv], lse [N,Hp]."""
  n, hp, kp_dim = q.shape
  kp = idx.shape[1]
  bk, bv = bs.block_k, bs.block_v
  n_chunks = kp // bk
  dtype = q.dtype
  qk_scale = scale * _LOG2E  # softmax in base 2: one FMA per logit

  def body(q_ref, kv_ref, idx_ref, o_ref, lse_ref, lse_smem, bar_in, bar_kv):
    t = lax.axis_index("t")
    hb = lax.axis_index("h")
    vb = lax.axis_index("v")
    # Two SMEM scopes: the main loop's 216 KiB are released before the output tile is staged.
    acc, m_i, l_i = pl.run_scoped(
      functools.partial(main, q_ref, kv_ref, idx_ref, bar_in, bar_kv),
      _swizzled((HEAD_BLOCK, kp_dim), dtype),  # q tile
      plgpu.SMEM((bk, kp_dim), dtype),  # untiled landing buffer of the row copies
      _swizzled((bk, kp_dim), dtype),  # wgmma operand
    )
    has = l_i > 0
    inv = jnp.where(has, 1.0 / jnp.where(has, l_i, 1.0), 0.0)
    lse_smem[...] = jnp.where(has, m_i * _LN2 + jnp.log(jnp.where(has, l_i, 1.0)), jnp.inf)

    def epilogue(o_smem):
      o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(
        o_smem, o_ref.at[t, pl.ds(hb * HEAD_BLOCK, HEAD_BLOCK), pl.ds(vb * bv, bv)]
      )

      @pl.when(vb == 0)
      def _():
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[t, pl.ds(hb * HEAD_BLOCK, HEAD_BLOCK)])

      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(epilogue, _swizzled((HEAD_BLOCK, bv), dtype))

  def main(q_ref, kv_ref, idx_ref, bar_in, bar_kv, q_smem, stage, kv_smem):
    t = lax.axis_index("t")
    hb = lax.axis_index("h")
    vb = lax.axis_index("v")
    plgpu.copy_gmem_to_smem(q_ref.at[t, pl.ds(hb * HEAD_BLOCK, HEAD_BLOCK)], q_smem, bar_in.at[0])
    idx_row = idx_ref.at[t]  # read from GMEM (L2-resident): 224 KiB of SMEM leaves no room

    def issue(j):
      # One TMA per selected row; invalid slots fetch row 0 and are masked in the logits.
      # Index loads first, then the copies (hoisting them made no measured difference on H200).
      rows = [jnp.maximum(idx_row[j * bk + i], 0) for i in range(1 if bs.probe_one_copy else bk)]
      for i, r in enumerate(rows):
        plgpu.copy_gmem_to_smem(kv_ref.at[pl.ds(r, 1)], stage.at[pl.ds(i, 1)], bar_kv)

    issue(0)
    plgpu.barrier_wait(bar_in.at[0])

    m_i = plgpu.layout_cast(
      jnp.full((HEAD_BLOCK,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
    )
    l_i = plgpu.layout_cast(jnp.full((HEAD_BLOCK,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = plgpu.layout_cast(jnp.full((HEAD_BLOCK, bv), 0.0, jnp.float32), plgpu.Layout.WGMMA)

    def step(j, carry):
      acc, m_i, l_i = carry
      plgpu.barrier_wait(bar_kv)
      # untiled -> tiled+swizzled through registers; needs 64 rows to pass layout inference.
      kv_smem[...] = plgpu.load(stage, layout=plgpu.Layout.SMEM_GMEM_COPY((bk, kp_dim), dtype, 128))
      plgpu.commit_smem()

      @pl.when(j + 1 < n_chunks)
      def _():
        issue(j + 1)

      if bs.probe_no_math:
        return acc, m_i, l_i

      def qk_scope(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, kv_smem.T)
        return acc_ref[...]

      s = pl.run_scoped(qk_scope, plgpu.ACC((HEAD_BLOCK, bk), jnp.float32))
      ids = plgpu.load(
        idx_row.at[pl.ds(j * bk, bk)], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False
      )
      valid = lax.broadcast_in_dim(ids >= 0, s.shape, [1])
      s = jnp.where(valid, s * qk_scale, -jnp.inf)
      m_new = jnp.maximum(m_i, s.max(axis=1))
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all-invalid so far: keep exp finite
      alpha = jnp.exp2(m_i - m_use)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
      l_i = l_i * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

      acc = _mma_acc(acc, p.astype(dtype), kv_smem.at[:, pl.ds(vb * bv, bv)], interpret)
      return acc, m_new, l_i

    return lax.fori_loop(0, n_chunks, step, (acc, m_i, l_i))

  out_type = (
    jax.ShapeDtypeStruct((n, hp, n_v * bv), dtype),
    jax.ShapeDtypeStruct((n, hp), jnp.float32),
  )
  scratch = [
    plgpu.SMEM((HEAD_BLOCK,), jnp.float32),
    plgpu.Barrier(num_barriers=1),
    plgpu.Barrier(num_arrivals=1 if bs.probe_one_copy else bk),
  ]
  # v and h vary fastest, so the CTAs of one token run together and share its rows in L2.
  kern = plgpu.kernel(
    body,
    out_type=out_type,
    scratch_types=scratch,
    grid=(n_v, hp // HEAD_BLOCK, n),
    grid_names=("v", "h", "t"),
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=interpret,
  )
  return kern(q, kv, idx)
