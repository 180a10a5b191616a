# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Mosaic GPU (Hopper) sparse MLA backward, the gathered part: dq and the [dS; P] tiles.

Layout (ops.py folds the batch into rows exactly as for the forward, kernel_mosaic_gpu.py):
  q   [N, Hp, Kp]     N tokens, heads padded to 64s, row dim padded to 64s
  kv  [R, Kp]         R = B*S latent rows
  idx [N, kp]         int32 global row ids (b*S + s), -1 invalid, kp % 64 == 0
  do  [N, Hp, d_out]  dO, value columns zero-padded to d_out (a multiple of 128)
  lse, delta [N, Hp]  f32: the forward's lse (+inf on empty rows and padded heads) and
                      Δ - dlse with Δ = rowsum(O ∘ dO) (dlse zeroed where lse is not finite)
  -> dq [N, Hp, Kp], a [N, 2·Hp, kp] and qd [N, 2·Hp, Kp] (q's dtype): a[:, :Hp] = dS,
     a[:, Hp:] = P; qd = [q; dO] (dO's columns past d_out zero), the other operand of the dK
     product, stored from the q and dO tiles the kernel holds anyway (an XLA concatenation
     would read both back from HBM).
  Chunks after a token's last valid slot (_common.live_chunks) are skipped: their
  slots of `a` are left unwritten, and their dK rows are never read (invalid ids).

Per token t, head h, slot s with row r = kv[idx[t, s]] (invalid slots give P = 0):
  P = exp(scale·q·rᵀ - lse), dP = dO·r[:d_out]ᵀ, dS = scale·P∘(dP - delta), dq = Σ_s dS·r.
The kernel never forms dkv: its rows, dK_r = Σ_h dS·q_h + P·dO_h, are one dense product per token
of `a` with [q; dO] (no gather), which ops.py runs in XLA before the sorted segment sum adds
them per row (kernel_segment_sum_triton.py). What the kernel saves is every pass over the
gathered rows: XLA's backward writes them out, reads them twice more, and writes and re-reads
the f32 logits.

One CTA = one token x 64 heads (a token's head blocks as one cluster, as the forward), three
warpgroups (WG):
  WG0 and WG1 ("compute"), WG2 ("copy": gathers the rows and owns a third of dq).
q (Kp/64 tiles) and dO (d_out/64 tiles) stay in SMEM for the whole token. Per 64-slot chunk:
  1. WG2 gathers the chunk's rows into ONE swizzled wgmma operand R [64, Kp] with the forward's
     direct 16-byte cp.async pieces (kernel_mosaic_gpu._direct_ops; the interpreter uses Pallas
     row copies instead). Its slot ids are staged per chunk in SMEM (one TMA; the next chunk's
     are fetched while this one is multiplied).
  2. WG0: S = q·Rᵀ -> P (bf16) into SMEM, then stores the tile to `a` (TMA). WG1: dP =
     dO·R[:, :d_out]ᵀ, then with P from SMEM dS = scale·P∘(dP - delta) (bf16) into SMEM and
     to `a`. The logits work is split, not duplicated.
  3. dq[:, tiles of WG w] += dS·R[:, tiles]: each of the three WGs keeps a third of the dq
     column tiles in registers across chunks (at Kp = 576: 3 tiles = 96 f32 registers a
     thread), side by side, so a WG's share is one wgmma per chunk (N = 192: one issue and
     one wait, not one per tile). With 384 threads ptxas gives each thread at most 168
     registers at launch, so a 2-WG split (5 + 4 tiles = 160 registers) cannot sit next to
     the 64 x 64 logits; hence the copy WG's share. Then R is free for the next chunk.
Registers: the compute WGs hold their dq tiles beside the logits, P / dP and the slot mask,
more than the launch's 168 a thread, while the copy WG holds its dq tiles and the copy
addresses; so the copy WG gives registers back and the compute WGs take them (setmaxnreg,
`REGISTERS`), which ptxas honours per warpgroup. The wgmma operands are indexed by
`kernel_mosaic_gpu.opaque_zero` each chunk, so their SMEM descriptors are rebuilt in the loop
instead of hoisted out of it as ~140 live registers: ptxas then spills nothing.

SMEM at V3.2 (Kp 576, d_out 512, bf16): q 72 KiB + dO 64 + R 72 + P 8 + dS 8 + the chunk's ids
and the raw mbarriers 1 = 225 KiB (+ Pallas barriers) of 227. The dq output reuses q's tiles.
No double buffering of R (no room).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common
from pallas_kernels.sparse_mla import kernel_mosaic_gpu as fwd

_LOG2E = math.log2(math.e)
HEAD_BLOCK = fwd.HEAD_BLOCK
# (compute, copy) registers a thread after setmaxnreg: 2 x 184 + 136 = 504, the pool the CTA
# launches with (3 warpgroups x 168). Of the splits tried before the descriptors stayed in the
# loop, this one spilled least; with them in the loop ptxas spills nothing here.
REGISTERS = (184, 136)
BLOCK_K = fwd.BLOCK_K
_BARRIERS = 8  # Pallas barriers of a hardware run (the interpreter's row barrier is extra)


def smem_bytes(kp_dim: int, d_out: int, itemsize: int) -> int:
  """SMEM the kernel asks for (Mosaic GPU rounds every buffer up to whole KiB): q, dO and R
  tiles, P and dS tiles, the chunk's ids + raw mbarriers, and 8 bytes per Pallas barrier."""
  tile = HEAD_BLOCK * 64 * itemsize
  tiles = (2 * kp_dim // 64 + d_out // 64 + 2) * tile
  return fwd.kib(tiles) + fwd.kib(2 * BLOCK_K * 4) + 8 * _BARRIERS


def fits(kp_dim: int, d_out: int, itemsize: int = 2) -> bool:
  return smem_bytes(kp_dim, d_out, itemsize) <= fwd._SMEM_BYTES


def tile_owners(n_tiles: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """dq column tiles of WG0, WG1, WG2: contiguous thirds (WG0 takes the remainder first)."""
  per = [n_tiles // 3 + (1 if w < n_tiles % 3 else 0) for w in range(3)]
  starts = np.cumsum([0] + per)
  return tuple(tuple(range(starts[w], starts[w + 1])) for w in range(3))


def sparse_mla_bwd(q, kv, idx, do, lse, delta, *, scale: float, interpret=False):
  """q [N,Hp,Kp], kv [R,Kp], idx [N,kp], do [N,Hp,d_out], lse/delta [N,Hp] -> dq [N,Hp,Kp],
  a [N, 2·Hp, kp] = [dS; P] and qd [N, 2·Hp, Kp] = [q; dO] (q's dtype). See the module
  docstring; the shape rules are the forward's, and `fits(Kp, d_out)`."""
  n, hp, kp_dim = q.shape
  kp = idx.shape[1]
  d_out = do.shape[-1]
  bk = BLOCK_K
  if hp % HEAD_BLOCK or kp_dim % 64 or kp % bk or d_out % 128 or d_out > kp_dim:
    raise ValueError(f"bad kernel layout: q {q.shape}, idx {idx.shape}, do {do.shape}")
  if do.shape[:2] != (n, hp) or lse.shape != (n, hp) or delta.shape != (n, hp):
    raise ValueError(f"bad shapes: q {q.shape}, do {do.shape}, lse {lse.shape}, {delta.shape}")
  if not fits(kp_dim, d_out, q.dtype.itemsize) and not interpret:
    need = smem_bytes(kp_dim, d_out, q.dtype.itemsize)
    raise ValueError(f"the backward needs {need} of {fwd._SMEM_BYTES} bytes of SMEM at Kp={kp_dim}")
  n_chunks = kp // bk
  n_tiles = kp_dim // 64
  do_tiles = d_out // 64
  dtype = q.dtype
  qk_scale = scale * _LOG2E
  owners = tile_owners(n_tiles)
  if len(owners[0]) > 4:  # a WG's dq tiles are one wgmma, N = 64 per tile <= 256
    raise ValueError(f"the backward takes Kp <= 768, got {kp_dim}")
  idx3 = idx.reshape(n, n_chunks, bk)
  live = _common.live_chunks(idx, bk)  # per token, chunks up to its last valid slot
  lse2 = lse * _LOG2E
  oob = plgpu.OOBFillMode.PROMISE_IN_BOUNDS
  if not interpret:
    direct_init, direct_issue, mbarrier_wait = fwd._direct_ops(bk, kp_dim * q.dtype.itemsize)

  def zeros_wgmma(tiles):
    """A WG's dq accumulator: its tiles side by side [64, 64·len(tiles)] f32 (None: no tiles)."""
    if not tiles:
      return None
    shape = (HEAD_BLOCK, 64 * len(tiles))
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)

  def body(
    q_ref, kv_ref, idx_ref, live_ref, do_ref, lse_ref, delta_ref, dq_ref, a_ref, qd_ref, bufs, bars
  ):
    q_smem, do_smem, r_smem, p_smem, ds_smem, misc = bufs
    bar_q, bar_idx, bar_full, bar_p, bar_ds, bar_rfree, bar_pfree, bar_dsfree, bar_end = bars
    # misc (int32): row 0 the chunk's slot ids (the copy WG's), row 1 [:4] the raw mbarriers.
    ids_smem, raw_bars = misc.at[0], misc.at[1, pl.ds(0, 4)]
    t = lax.axis_index("t")
    hb = lax.axis_index("h")
    wg = lax.axis_index("wg")
    heads = pl.ds(hb * HEAD_BLOCK, HEAD_BLOCK)
    do_heads = pl.ds(hp + hb * HEAD_BLOCK, HEAD_BLOCK)  # this block's dO rows in `qd`
    n_live = live_ref[t]  # chunks this token runs (>= 1): later ones are all invalid

    def wait_rows(j):
      """The chunk's rows have landed in R (each waiting WG tracks the phases itself)."""
      if interpret:
        plgpu.barrier_wait(bar_full)
      else:
        mbarrier_wait(raw_bars.at[pl.ds(0, 2)], j % 2)
        plgpu.commit_smem()  # the cp.async writes (generic proxy) before wgmma reads them

    def dq_step(acc, tiles, z):
      """acc += dS·R over the WG's contiguous dq tiles: one wgmma (N = 64 per tile <= 256)."""
      if not tiles:
        return acc
      dq_cols = r_smem.at[z].at[:, pl.ds(tiles[0] * 64, 64 * len(tiles))]
      return fwd._mma_acc(acc, ds_smem, dq_cols, interpret)

    def finish(acc, tiles):
      """All WGs past their last read of q_smem (their stores from it included): write this
      WG's dq tiles through it."""
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      plgpu.barrier_arrive(bar_end)
      plgpu.barrier_wait(bar_end)
      acc = acc.astype(dtype) if tiles else None
      for i, c in enumerate(tiles):
        q_smem.at[c][...] = acc[:, i * 64 : (i + 1) * 64]
      plgpu.commit_smem()
      for c in tiles:
        plgpu.copy_smem_to_gmem(q_smem.at[c], dq_ref.at[t, heads, pl.ds(c * 64, 64)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 0)
    def _():
      # The raw mbarriers' init runs on the block's first thread (WG0, as in the forward),
      # before the q/dO copies: waiting for their barrier orders the init for every WG.
      if not interpret:
        direct_init(raw_bars)
      for c in range(n_tiles):
        plgpu.copy_gmem_to_smem(q_ref.at[t, heads, pl.ds(c * 64, 64)], q_smem.at[c], bar_q)
      for c in range(do_tiles):
        plgpu.copy_gmem_to_smem(do_ref.at[t, heads, pl.ds(c * 64, 64)], do_smem.at[c], bar_q)

    @pl.when(wg == 2)
    def _copy_wg():
      if not interpret:
        plgpu.set_max_registers(REGISTERS[1], action="decrease")
      plgpu.copy_gmem_to_smem(idx_ref.at[t, 0], ids_smem, bar_idx, oob_mode=oob)
      plgpu.barrier_wait(bar_q)  # the raw mbarriers are set up; q and dO landed
      # [q; dO] out to `qd` for the dK product (ops.py), from the tiles already in SMEM.
      for c in range(n_tiles):
        plgpu.copy_smem_to_gmem(q_smem.at[c], qd_ref.at[t, heads, pl.ds(c * 64, 64)])
      for c in range(do_tiles):
        plgpu.copy_smem_to_gmem(do_smem.at[c], qd_ref.at[t, do_heads, pl.ds(c * 64, 64)])

      def issue(j):
        plgpu.barrier_wait(bar_idx)
        if interpret:  # Pallas row copies (the interpreter has no inline Mosaic GPU)
          rows = [fwd.stand_in_row(ids_smem[i], i, kv_ref.shape[0]) for i in range(bk)]
          for i, row in enumerate(rows):
            dst = r_smem.at[0, pl.ds(i, 1)]
            plgpu.copy_gmem_to_smem(kv_ref.at[pl.ds(row, 1)], dst, bar_full)
        else:
          direct_issue(kv_ref, r_smem, ids_smem, raw_bars, 0)

      def step(j, acc):
        # Named regions: what kernel_mosaic_gpu.PROFILE records (no code of their own otherwise).
        with jax.named_scope("slot_wait"):

          @pl.when(j > 0)
          def _():
            plgpu.barrier_wait(bar_rfree)  # WG0/WG1 are done with chunk j-1's rows

        with jax.named_scope("issue"):
          issue(j)
        with jax.named_scope("ds_wait"):
          plgpu.barrier_wait(bar_ds)
          wait_rows(j)  # also a warpgroup barrier: every thread has read the chunk's ids

        @pl.when(j + 1 < n_live)  # n_live <= n_chunks: the next chunk exists
        def _():  # the ids were read at issue: fetch the next chunk's
          plgpu.copy_gmem_to_smem(idx_ref.at[t, j + 1], ids_smem, bar_idx, oob_mode=oob)

        with jax.named_scope("dq"):
          acc = dq_step(acc, owners[2], fwd.opaque_zero(interpret))
        plgpu.barrier_arrive(bar_dsfree)
        return acc

      acc = lax.fori_loop(0, n_live, step, zeros_wgmma(owners[2]))
      plgpu.barrier_wait(bar_rfree)  # observe every phase (the interpreter checks)
      finish(acc, owners[2])

    @pl.when(wg < 2)
    def _compute_wg():
      if not interpret:
        plgpu.set_max_registers(REGISTERS[0], action="increase")
      plgpu.barrier_wait(bar_q)

      @pl.when(wg == 0)
      def _():  # qd's dO rows past d_out are zeros: from the P tile before its first use
        if n_tiles > do_tiles:
          p_smem[...] = zeros_wgmma((0,)).astype(dtype)
          plgpu.commit_smem()
        for c in range(do_tiles, n_tiles):
          plgpu.copy_smem_to_gmem(p_smem, qd_ref.at[t, do_heads, pl.ds(c * 64, 64)])

      lse_h = plgpu.load(lse_ref.at[t, heads], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
      delta_h = plgpu.load(
        delta_ref.at[t, heads], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False
      )

      def logits(src, k_tiles, z):
        def scope(acc_ref):
          for c in range(k_tiles):
            plgpu.wgmma(acc_ref, src.at[z + c], r_smem.at[z].at[:, pl.ds(c * 64, 64)].T)
          return acc_ref[...]

        return pl.run_scoped(scope, plgpu.ACC((HEAD_BLOCK, bk), jnp.float32))

      def step(j, acc, w):
        z = fwd.opaque_zero(interpret)  # keeps the operands' descriptors in the loop
        with jax.named_scope("rows_wait"):
          wait_rows(j)
        slots = pl.ds(j * bk, bk)
        if w == 0:
          ids = plgpu.load(idx_ref.at[t, j], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
          valid = lax.broadcast_in_dim(ids >= 0, (HEAD_BLOCK, bk), [1])
          with jax.named_scope("s"):
            s = logits(q_smem, n_tiles, z)
          p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(lse_h, s.shape, [0]))
          p = jnp.where(valid, p, 0.0)

          with jax.named_scope("p_free_wait"):

            @pl.when(j > 0)
            def _():
              plgpu.barrier_wait(bar_pfree)  # WG1 read chunk j-1's P

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # ... and so did its store to `a`
          p_smem[...] = p.astype(dtype)
          plgpu.commit_smem()
          plgpu.barrier_arrive(bar_p)
          plgpu.copy_smem_to_gmem(
            p_smem, a_ref.at[t, pl.ds(hp + hb * HEAD_BLOCK, HEAD_BLOCK), slots]
          )
          with jax.named_scope("ds_wait"):
            plgpu.barrier_wait(bar_ds)
        else:
          with jax.named_scope("dp"):
            dp = logits(do_smem, do_tiles, z)
          with jax.named_scope("p_wait"):
            plgpu.barrier_wait(bar_p)
          p = p_smem[...].astype(jnp.float32)
          plgpu.barrier_arrive(bar_pfree)
          # P is already 0 at invalid slots (WG0 masked it) and dP is finite there (a finite
          # stand-in row was fetched), so dS is 0 there without a mask of its own.
          ds = scale * p * (dp - lax.broadcast_in_dim(delta_h, dp.shape, [0]))

          with jax.named_scope("ds_free_wait"):

            @pl.when(j > 0)
            def _():
              plgpu.barrier_wait(bar_dsfree)  # chunk j-1's dS read by all three WGs

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # ... and by its store to `a`
          ds_smem[...] = ds.astype(dtype)
          plgpu.commit_smem()
          plgpu.barrier_arrive(bar_ds)
          plgpu.copy_smem_to_gmem(ds_smem, a_ref.at[t, heads, slots])
        with jax.named_scope("dq"):
          acc = dq_step(acc, owners[w], z)
        plgpu.barrier_arrive(bar_rfree)
        plgpu.barrier_arrive(bar_dsfree)
        return acc

      for w in range(2):

        @pl.when(wg == w)
        def _(w=w):
          acc = lax.fori_loop(0, n_live, functools.partial(step, w=w), zeros_wgmma(owners[w]))
          plgpu.barrier_wait(bar_pfree if w == 0 else bar_dsfree)  # observe the last phase
          finish(acc, owners[w])

  def sparse_mla_bwd_kernel(
    q_ref, kv_ref, idx_ref, live_ref, do_ref, lse_ref, delta_ref, dq_ref, a_ref, qd_ref
  ):
    sw = fwd._swizzled
    bufs = (
      sw((n_tiles, HEAD_BLOCK, 64), dtype),  # q, then the dq output tiles
      sw((do_tiles, HEAD_BLOCK, 64), dtype),  # dO
      sw((1, bk, kp_dim), dtype),  # R: the chunk's rows (one operand slot)
      sw((HEAD_BLOCK, bk), dtype),  # P
      sw((HEAD_BLOCK, bk), dtype),  # dS
      plgpu.SMEM((2, bk), jnp.int32),  # the chunk's ids, raw mbarriers
    )
    bars = (
      plgpu.Barrier(num_arrivals=n_tiles + do_tiles),  # q and dO tiles
      plgpu.Barrier(num_arrivals=1),  # the chunk's ids
      plgpu.Barrier(num_arrivals=bk) if interpret else None,  # rows (interpreter's copies)
      plgpu.Barrier(num_arrivals=1),  # P in SMEM (WG0)
      plgpu.Barrier(num_arrivals=1),  # dS in SMEM (WG1)
      plgpu.Barrier(num_arrivals=2),  # R read by WG0 and WG1 (logits and dq)
      plgpu.Barrier(num_arrivals=1),  # P read by WG1
      plgpu.Barrier(num_arrivals=3),  # dS read (dq of all three WGs)
      plgpu.Barrier(num_arrivals=3),  # every WG past its last q read: dq may reuse q_smem
    )
    pl.run_scoped(
      lambda b, r: body(
        q_ref, kv_ref, idx_ref, live_ref, do_ref, lse_ref, delta_ref, dq_ref, a_ref, qd_ref, b, r
      ),
      bufs,
      bars,
      collective_axes="wg",
    )

  out_type = (
    jax.ShapeDtypeStruct((n, hp, kp_dim), dtype),
    jax.ShapeDtypeStruct((n, 2 * hp, kp), dtype),
    jax.ShapeDtypeStruct((n, 2 * hp, kp_dim), dtype),
  )
  kern = fwd.token_kernel(sparse_mla_bwd_kernel, out_type, hp, n, 3, interpret)
  return kern(q, kv, idx3, live, do, lse2, delta)
