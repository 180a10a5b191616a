# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Mosaic GPU (Hopper) head-summed attention probabilities at the selected slots (the sparse KL
target), from the forward's lse.

Layout (ops.py folds the batch into rows exactly as for the forward, kernel_mosaic_gpu.py):
  q    [N, Hp, Kp]  N = B*T tokens, heads padded to 64s, row dim padded to 64s
  kv   [R, Kp]      R = B*S latent rows
  idx  [N, kp]      int32 global row ids (b*S + s), -1 invalid, kp % 64 == 0
  lse2 [N, Hp]      f32: the forward's lse times log2(e), +inf on padded heads and empty rows
  -> [N, Hp/64, kp] f32: per head block, Σ_h exp2(qk_scale·q_h·r_s - lse2_h), 0 at invalid
     slots (qk_scale = scale·log2(e)); the wrapper sums the head blocks and divides by H.
     Chunks after a token's last valid slot (_common.live_chunks) are skipped and
     left unwritten: the wrapper zeroes every invalid slot.

One CTA = one token x 64 heads (a token's head blocks as one cluster, as the forward, so they
share its rows in L2), three warpgroups: WG2 gathers each 64-slot chunk with the forward's direct
16-byte `cp.async` copies into one of two swizzled operand slots; WG0 takes the even chunks
(slot 0) and WG1 the odd ones (slot 1), so two chunks are in flight and each slot has one reader.
The logits are computed transposed, Sᵀ = R·qᵀ [64 slots, 64 heads], so the head sum is a row
sum that stays inside a warp (the WGMMA layout spreads rows over warps, columns over lanes). The
64 sums go out through a 256-byte SMEM row and one TMA store per chunk.
Nothing [T, k, Kp] is gathered in GMEM and no P·V is done: half the forward's tensor-core work.
SMEM at V3.2 (Kp 576, k 2048, bf16): q 72 KiB + two operand slots 144 + the token's ids 8 +
the sums and raw mbarriers 1 = 225 KiB (`smem_bytes`; longer idx rows do not fit, `fits`).
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common
from pallas_kernels.sparse_mla import kernel_mosaic_gpu as fwd

HEAD_BLOCK = fwd.HEAD_BLOCK
BLOCK_K = fwd.BLOCK_K
_MAX_IDX_CHUNKS = 256  # the token's slot ids are one 2-D TMA box: <= 256 per dimension


def smem_bytes(kp_dim: int, kp: int, itemsize: int) -> int:
  """SMEM the kernel asks for, at most: q + two operand slots (three 64-row tiles), the token's
  kp slot ids, the sums / raw mbarriers rows [3, 64] f32, each rounded up to whole KiB as Mosaic
  GPU does, and up to 128 bytes of barriers."""
  kib = fwd.kib
  return 3 * kib(HEAD_BLOCK * kp_dim * itemsize) + kib(4 * kp) + kib(3 * 4 * BLOCK_K) + 128


def fits(kp_dim: int, kp: int, itemsize: int = 2) -> bool:
  """Whether the token's kp slot ids fit in SMEM next to the tiles and in one TMA box."""
  return smem_bytes(kp_dim, kp, itemsize) <= fwd._SMEM_BYTES and kp // BLOCK_K <= _MAX_IDX_CHUNKS


def sparse_mla_probs(q, kv, idx, lse2, *, qk_scale: float, interpret=False):
  """q [N,Hp,Kp], kv [R,Kp], idx [N,kp], lse2 [N,Hp] -> [N, Hp/64, kp] f32 head-block sums
  (module docstring). Needs Hp % 64 == 0, Kp % 64 == 0, kp % 64 == 0 and `fits(Kp, kp)` (the
  token's ids staged in SMEM)."""
  n, hp, kp_dim = q.shape
  kp = idx.shape[1]
  bk = BLOCK_K
  if hp % HEAD_BLOCK or kp_dim % 64 or kp % bk or kv.shape[1] != kp_dim:
    raise ValueError(f"bad kernel layout: q {q.shape}, kv {kv.shape}, idx {idx.shape}")
  if lse2.shape != (n, hp) or idx.shape[0] != n:
    raise ValueError(f"bad shapes: q {q.shape}, idx {idx.shape}, lse2 {lse2.shape}")
  if not fits(kp_dim, kp, q.dtype.itemsize):
    need = smem_bytes(kp_dim, kp, q.dtype.itemsize)
    raise ValueError(
      f"the probabilities kernel stages the token's ids in SMEM: k={kp} slots at Kp={kp_dim} "
      f"need {need} of {fwd._SMEM_BYTES} bytes"
    )
  n_chunks = kp // bk
  n_tiles = kp_dim // 64
  idx3 = idx.reshape(n, n_chunks, bk)
  live = _common.live_chunks(idx, bk)  # per token, chunks up to its last valid slot
  oob = plgpu.OOBFillMode.PROMISE_IN_BOUNDS  # the wrapper keeps every copy in bounds
  if not interpret:
    direct_init, direct_issue, mbarrier_wait = fwd._direct_ops(bk, kp_dim * q.dtype.itemsize)

  def body(q_ref, kv_ref, idx_ref, live_ref, lse_ref, o_ref, bufs, bars):
    q_smem, kv_smem, idx_smem, misc = bufs
    bar_q, bar_idx, bar_full, bar_free = bars
    # misc rows: 0 / 1 the sums of WG0 / WG1, 2[:4] the two slots' raw mbarriers.
    raw_bars = misc.at[2, pl.ds(0, 4)]
    t = lax.axis_index("t")
    hb = lax.axis_index("h")
    wg = lax.axis_index("wg")
    heads = pl.ds(hb * HEAD_BLOCK, HEAD_BLOCK)
    n_live = live_ref[t]  # chunks this token runs (>= 1): later ones are all invalid

    @pl.when(wg == 0)
    def _():
      if not interpret:  # before the idx copy: its barrier orders the init for every WG
        direct_init(raw_bars)
      for c in range(n_tiles):
        plgpu.copy_gmem_to_smem(q_ref.at[t, heads, pl.ds(c * 64, 64)], q_smem.at[c], bar_q)
      plgpu.copy_gmem_to_smem(idx_ref.at[t], idx_smem, bar_idx, oob_mode=oob)

    @pl.when(wg == 2)
    def _copy_wg():
      issue_op = None if interpret else direct_issue
      fwd.copy_wg_direct(
        kv_ref, kv_smem, idx_smem, n_live, bar_idx, bar_free, bar_full, raw_bars, issue_op
      )

    @pl.when(wg < 2)
    def _compute_wg():
      plgpu.barrier_wait(bar_q)
      plgpu.barrier_wait(bar_idx)
      # lse per head = per column of the transposed logits
      lse_h = plgpu.load(lse_ref.at[t, heads], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)

      def chunk(w, i):
        j = 2 * i + w
        wait = None if interpret else mbarrier_wait
        st = fwd.chunk_logits_t(kv_smem.at[w], q_smem, wait, w, i, bar_full, raw_bars, interpret)
        plgpu.barrier_arrive(bar_free.at[w])  # the slot's rows are read
        ids = plgpu.load(idx_smem.at[j], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
        p = jnp.exp2(st * qk_scale - lax.broadcast_in_dim(lse_h, st.shape, [1]))
        p = jnp.where(lax.broadcast_in_dim(ids >= 0, st.shape, [0]), p, 0.0)
        row = misc.at[w]
        plgpu.wait_smem_to_gmem(0)  # the previous chunk's sums have left the row
        row[...] = p.sum(axis=1)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(row, o_ref.at[t, hb, pl.ds(j * bk, bk)])

      for w in range(2):

        @pl.when(wg == w)
        def _(w=w):
          @pl.loop(0, (n_live - w + 1) // 2)
          def _(i):
            chunk(w, i)

          plgpu.wait_smem_to_gmem(0)

  def sparse_mla_probs_kernel(q_ref, kv_ref, idx_ref, live_ref, lse_ref, o_ref):  # profile name
    sw = fwd._swizzled
    bufs = (
      sw((n_tiles, HEAD_BLOCK, 64), q.dtype),  # q
      sw((2, bk, kp_dim), q.dtype),  # two operand slots
      plgpu.SMEM((n_chunks, bk), jnp.int32),  # the token's slot ids
      plgpu.SMEM((3, bk), jnp.float32),  # the two WGs' sums, raw mbarriers
    )
    bars = fwd.single_pass_barriers(n_tiles, bk, interpret)
    pl.run_scoped(
      lambda b, r: body(q_ref, kv_ref, idx_ref, live_ref, lse_ref, o_ref, b, r),
      bufs,
      bars,
      collective_axes="wg",
    )

  out_type = jax.ShapeDtypeStruct((n, hp // HEAD_BLOCK, kp), jnp.float32)
  kern = fwd.token_kernel(sparse_mla_probs_kernel, out_type, hp, n, 3, interpret)
  return kern(q, kv, idx3, live, lse2)
