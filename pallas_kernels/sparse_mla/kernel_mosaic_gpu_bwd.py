# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Mosaic GPU (Hopper) sparse MLA backward, the gathered part: dq and the [dS; P] tiles.

Layout (ops.py folds the batch into rows exactly as for the forward, kernel_mosaic_gpu.py):
  q   [N, Hp, Kp]     N tokens, heads padded to 64s, row dim padded to 64s
  kv  [R, Kp]         R = B*S latent rows
  idx [N, kp]         int32 global row ids (b*S + s), -1 invalid, kp % 64 == 0 (chunk pairs)
  do  [N, Hp, d_out]  dO, value columns zero-padded to d_out (a multiple of 128)
  lse, delta [N, Hp]  f32: the forward's lse (+inf on empty rows and padded heads) and
                      Δ - dlse with Δ = rowsum(O ∘ dO) (dlse zeroed where lse is not finite)
  -> dq [N, Hp, Kp] and a [N, 2·Hp, kp] (q's dtype): a[:, :Hp] = dS, a[:, Hp:] = P.

Per token t, head h, slot s with row r = kv[idx[t, s]] (invalid slots give P = 0):
  P = exp(scale·q·rᵀ - lse), dP = dO·r[:d_out]ᵀ, dS = scale·P∘(dP - delta), dq = Σ_s dS·r.
The kernel never forms dkv: its rows, dK_r = Σ_h dS·q_h + P·dO_h, are one dense product per token
of `a` with [q; dO] (no gather), which ops.py runs in XLA before the sorted segment sum adds
them per row (kernel_segment_sum_triton.py). What the kernel saves is every pass over the
gathered rows: XLA's backward writes them out, reads them twice more, and writes and re-reads
the f32 logits.

One CTA = one token x 64 heads (grid: heads fastest, as the forward), three warpgroups (WG):
  WG0 and WG1 ("compute"), WG2 ("copy": gathers the rows and owns a third of dq).
q and dO stay in SMEM for the whole token. The slots go in chunks of 32 (BLOCK_K), chunk j in
operand slot j % 2 of R [2, 32, Kp], so the copy WG gathers chunk j + 2 into a slot while the
compute WGs multiply chunk j + 1 in the other. Per chunk:
  1. WG2 gathers the chunk's rows into its operand slot with the forward's direct 16-byte
     cp.async pieces (kernel_mosaic_gpu._direct_ops; the interpreter uses Pallas row copies
     instead), once WG0 and WG1 released the slot's previous chunk. The slot ids come per chunk
     into an SMEM ring of 4 (one TMA each, four chunks ahead).
  2. WG0: S = q·Rᵀ -> P (bf16) into SMEM, then stores the tile to `a` (TMA). WG1: dP =
     dO·R[:, :d_out]ᵀ, then with P from SMEM dS = scale·P∘(dP - delta) (bf16) into SMEM and
     to `a`. The logits work is split, not duplicated.
  3. dq[:, tiles of WG w] += dS·R[:, tiles]: each of the three WGs keeps a third of the dq
     64-column tiles in registers across chunks (at Kp = 576: 3 tiles = 96 f32 registers a
     thread), side by side, so a WG's share is one wgmma per chunk (N = 192: one issue and
     one wait, not one per tile). With 384 threads ptxas gives each thread at most 168
     registers at launch, so a 2-WG split (5 + 4 tiles = 160 registers) cannot sit next to
     the logits; hence the copy WG's share. Then the slot is released.
Every wgmma operand (q, dO, R, P, dS) is stored in 32-column tiles with the 64-byte swizzle:
wgmma takes K in groups of the swizzle's width and dq's K is the chunk's 32 slots, and the A
and B operands of one wgmma share a swizzle.
Registers: the compute WGs hold their dq tiles beside the logits, P / dP and the slot mask,
more than the launch's 168 a thread, while the copy WG holds its dq tiles and the copy
addresses; so the copy WG gives registers back and the compute WGs take them (setmaxnreg,
`REGISTERS`), which ptxas honours per warpgroup. The wgmma operands are indexed by
`kernel_mosaic_gpu.opaque_zero` each chunk, so their SMEM descriptors are rebuilt in the loop
instead of hoisted out of it as live registers: ptxas then spills nothing.

SMEM at V3.2 (Kp 576, d_out 512, bf16): q 72 KiB + dO 64 + R 72 (two 32-row slots) + P 4 + dS
4 + the ids ring and the raw mbarriers 1 = 217 KiB (+ Pallas barriers) of 227 (`smem_bytes`).
The dq output reuses q's tiles.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sparse_mla import kernel_mosaic_gpu as fwd

_LOG2E = math.log2(math.e)
HEAD_BLOCK = fwd.HEAD_BLOCK
# (compute, copy) registers a thread after setmaxnreg: 2 x 184 + 136 = 504, the pool the CTA
# launches with (3 warpgroups x 168). Of the splits tried before the descriptors stayed in the
# loop, this one spilled least; with them in the loop ptxas spills nothing here.
REGISTERS = (184, 136)
BLOCK_K = 32  # slots per chunk: two chunks' rows (two operand slots of R) fit beside q and dO
IDS_RING = 4  # SMEM slots of per-chunk slot ids (chunk j in slot j % 4)
_BARRIERS = 1 + IDS_RING + 2 + 2 + 1 + 1 + 1  # q/dO, ids, P/dS, R free, P free, dS free, end
# Every operand in 32-column tiles with the 64-byte swizzle: wgmma's K comes in groups of the
# swizzle's width, and dq's K is a chunk's 32 slots (dS and R of one operand slot).
_TILE = 32
_SWIZZLE = (plgpu.TilingTransform((8, _TILE)), plgpu.SwizzleTransform(2 * _TILE))


def smem_bytes(kp_dim: int, d_out: int, itemsize: int) -> int:
  """SMEM the kernel asks for (Mosaic GPU rounds every buffer up to whole KiB): q and dO tiles,
  the two operand slots of R, the P and dS tiles, the ids ring + raw mbarriers, and the Pallas
  barriers."""
  head_tile = HEAD_BLOCK * 64 * itemsize  # per 64 columns
  slots = 2 * BLOCK_K * kp_dim * itemsize
  ps = 2 * fwd.kib(HEAD_BLOCK * BLOCK_K * itemsize)
  return (
    (kp_dim // 64 + d_out // 64) * head_tile
    + fwd.kib(slots)
    + ps
    + fwd.kib((IDS_RING + 1) * BLOCK_K * 4)
    + 8 * _BARRIERS
  )


def fits(kp_dim: int, d_out: int, itemsize: int = 2) -> bool:
  return smem_bytes(kp_dim, d_out, itemsize) <= fwd._SMEM_BYTES


def tile_owners(n_tiles: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """dq column tiles of WG0, WG1, WG2: contiguous thirds (WG0 takes the remainder first)."""
  per = [n_tiles // 3 + (1 if w < n_tiles % 3 else 0) for w in range(3)]
  starts = np.cumsum([0] + per)
  return tuple(tuple(range(starts[w], starts[w + 1])) for w in range(3))


def sparse_mla_bwd(q, kv, idx, do, lse, delta, *, scale: float, interpret=False):
  """q [N,Hp,Kp], kv [R,Kp], idx [N,kp], do [N,Hp,d_out], lse/delta [N,Hp] -> dq [N,Hp,Kp] and
  a [N, 2·Hp, kp] = [dS; P] (q's dtype). See the module docstring; the shape rules are the
  forward's, and `fits(Kp, d_out)`."""
  n, hp, kp_dim = q.shape
  kp = idx.shape[1]
  d_out = do.shape[-1]
  bk = BLOCK_K
  if hp % HEAD_BLOCK or kp_dim % 64 or kp % (2 * bk) or d_out % 128 or d_out > kp_dim:
    raise ValueError(f"bad kernel layout: q {q.shape}, idx {idx.shape}, do {do.shape}")
  if do.shape[:2] != (n, hp) or lse.shape != (n, hp) or delta.shape != (n, hp):
    raise ValueError(f"bad shapes: q {q.shape}, do {do.shape}, lse {lse.shape}, {delta.shape}")
  if not fits(kp_dim, d_out, q.dtype.itemsize) and not interpret:
    need = smem_bytes(kp_dim, d_out, q.dtype.itemsize)
    raise ValueError(f"the backward needs {need} of {fwd._SMEM_BYTES} bytes of SMEM at Kp={kp_dim}")
  n_chunks = kp // bk
  n_tiles = kp_dim // 64  # dq's 64-column tiles (tile_owners)
  q_tiles, do_tiles = kp_dim // _TILE, d_out // _TILE  # SMEM tiles of q and dO
  dtype = q.dtype
  qk_scale = scale * _LOG2E
  owners = tile_owners(n_tiles)
  if len(owners[0]) > 4:  # a WG's dq tiles are one wgmma, N = 64 per tile <= 256
    raise ValueError(f"the backward takes Kp <= 768, got {kp_dim}")
  idx3 = idx.reshape(n, n_chunks, bk)
  lse2 = lse * _LOG2E
  oob = plgpu.OOBFillMode.PROMISE_IN_BOUNDS
  direct_issue = None
  if not interpret:
    direct_init, direct_issue, mbarrier_wait = fwd._direct_ops(
      bk, kp_dim * q.dtype.itemsize, swizzle=2 * _TILE
    )

  def zeros_wgmma(tiles):
    """A WG's dq accumulator: its tiles side by side [64, 64·len(tiles)] f32 (None: no tiles)."""
    if not tiles:
      return None
    shape = (HEAD_BLOCK, 64 * len(tiles))
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)

  def body(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_ref, a_ref, bufs, bars):
    q_smem, do_smem, r_smem, p_smem, ds_smem, misc = bufs
    bar_q, bar_ids, bar_full, bar_p, bar_ds, bar_rfree, bar_pfree, bar_dsfree, bar_end = bars
    # misc (int32): rows 0..IDS_RING-1 the ids ring (the copy WG's), the last row [:4] the two
    # operand slots' raw mbarriers.
    ids_ring, raw_bars = misc.at[pl.ds(0, IDS_RING)], misc.at[IDS_RING, pl.ds(0, 4)]
    t = lax.axis_index("t")
    hb = lax.axis_index("h")
    wg = lax.axis_index("wg")
    heads = pl.ds(hb * HEAD_BLOCK, HEAD_BLOCK)

    def wait_rows(j, slot):
      """Chunk j's rows have landed in operand slot `slot` = j % 2 (static); each waiting WG
      tracks the phases itself (the slot's (j // 2)-th fill)."""
      if interpret:
        plgpu.barrier_wait(bar_full.at[slot])
      else:
        mbarrier_wait(raw_bars.at[pl.ds(2 * slot, 2)], (j // 2) % 2)
        plgpu.commit_smem()  # the cp.async writes (generic proxy) before wgmma reads them

    def dq_step(acc, tiles, z, slot):
      """acc += dS·R over the WG's contiguous dq tiles: one wgmma (N = 64 per tile <= 256)."""
      if not tiles:
        return acc
      dq_cols = r_smem.at[z + slot].at[:, pl.ds(tiles[0] * 64, 64 * len(tiles))]
      return fwd._mma_acc(acc, ds_smem, dq_cols, interpret)

    def finish(acc, tiles):
      """All WGs past their last read of q_smem: write this WG's dq tiles through it."""
      plgpu.barrier_arrive(bar_end)
      plgpu.barrier_wait(bar_end)
      acc = acc.astype(dtype) if tiles else None
      per = 64 // _TILE  # SMEM tiles per dq tile
      smem_tiles = [per * c + i for c in tiles for i in range(per)]
      for i, c in enumerate(smem_tiles):
        q_smem.at[c][...] = acc[:, i * _TILE : (i + 1) * _TILE]
      plgpu.commit_smem()
      for c in smem_tiles:
        plgpu.copy_smem_to_gmem(q_smem.at[c], dq_ref.at[t, heads, pl.ds(c * _TILE, _TILE)])
      plgpu.wait_smem_to_gmem(0)

    def pairs(step, acc):
      """Chunks in pairs (n_chunks is even: kp % 64 == 0), chunk 2i + s in operand slot s, so
      every slot, ring and barrier index below is static."""

      def pair(i, acc):
        for s in range(2):
          acc = step(2 * i + s, s, acc)
        return acc

      return lax.fori_loop(0, n_chunks // 2, pair, acc)

    @pl.when(wg == 0)
    def _():
      # The raw mbarriers' init runs on the block's first thread (WG0, as in the forward),
      # before the q/dO copies: waiting for their barrier orders the init for every WG.
      if not interpret:
        direct_init(raw_bars)
      for c in range(q_tiles):
        plgpu.copy_gmem_to_smem(q_ref.at[t, heads, pl.ds(c * _TILE, _TILE)], q_smem.at[c], bar_q)
      for c in range(do_tiles):
        plgpu.copy_gmem_to_smem(do_ref.at[t, heads, pl.ds(c * _TILE, _TILE)], do_smem.at[c], bar_q)

    @pl.when(wg == 2)
    def _copy_wg():
      if not interpret:
        plgpu.set_max_registers(REGISTERS[1], action="decrease")

      def fetch_ids(j):
        r = j % IDS_RING
        plgpu.copy_gmem_to_smem(idx_ref.at[t, j], ids_ring.at[r], bar_ids.at[r], oob_mode=oob)

      def issue(j, slot):
        r = j % IDS_RING
        plgpu.barrier_wait(bar_ids.at[r])
        fwd.issue_chunk(kv_ref, r_smem, ids_ring.at[r], slot, bar_full, raw_bars, direct_issue)

      for j in range(min(IDS_RING, n_chunks)):
        fetch_ids(j)
      plgpu.barrier_wait(bar_q)  # the raw mbarriers are set up (WG2 reads no q)
      for j in range(min(2, n_chunks)):
        issue(j, j)

      def step(j, slot, acc):
        # Named regions: what kernel_mosaic_gpu.PROFILE records (no code of their own otherwise).
        with jax.named_scope("ds_wait"):
          plgpu.barrier_wait(bar_ds)
          wait_rows(j, slot)  # every thread's copies of chunk j landed, so all read its ids

        @pl.when(j + IDS_RING < n_chunks)
        def _():
          fetch_ids(jnp.minimum(j + IDS_RING, n_chunks - 1))

        with jax.named_scope("dq"):
          acc = dq_step(acc, owners[2], fwd.opaque_zero(interpret), slot)
        plgpu.barrier_arrive(bar_dsfree)

        @pl.when(j + 2 < n_chunks)
        def _():  # refill this slot with chunk j + 2 once WG0/WG1 are done with chunk j
          with jax.named_scope("slot_wait"):
            plgpu.barrier_wait(bar_rfree.at[slot])
          with jax.named_scope("issue"):
            issue(jnp.minimum(j + 2, n_chunks - 1), slot)

        return acc

      acc = pairs(step, zeros_wgmma(owners[2]))
      for j in range(max(0, n_chunks - 2), n_chunks):
        plgpu.barrier_wait(bar_rfree.at[j % 2])  # observe every phase (the interpreter checks)
      finish(acc, owners[2])

    @pl.when(wg < 2)
    def _compute_wg():
      if not interpret:
        plgpu.set_max_registers(REGISTERS[0], action="increase")
      plgpu.barrier_wait(bar_q)
      lse_h = plgpu.load(lse_ref.at[t, heads], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
      delta_h = plgpu.load(
        delta_ref.at[t, heads], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False
      )

      def logits(src, k_tiles, z, slot):
        def scope(acc_ref):
          rows = r_smem.at[z + slot]
          for c in range(k_tiles):
            plgpu.wgmma(acc_ref, src.at[z + c], rows.at[:, pl.ds(c * _TILE, _TILE)].T)
          return acc_ref[...]

        return pl.run_scoped(scope, plgpu.ACC((HEAD_BLOCK, bk), jnp.float32))

      def step(j, slot, acc, w):
        z = fwd.opaque_zero(interpret)  # keeps the operands' descriptors in the loop
        with jax.named_scope("rows_wait"):
          wait_rows(j, slot)
        slots = pl.ds(j * bk, bk)
        if w == 0:
          ids = plgpu.load(idx_ref.at[t, j], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
          valid = lax.broadcast_in_dim(ids >= 0, (HEAD_BLOCK, bk), [1])
          with jax.named_scope("s"):
            s = logits(q_smem, q_tiles, z, slot)
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
            dp = logits(do_smem, do_tiles, z, slot)
          with jax.named_scope("p_wait"):
            plgpu.barrier_wait(bar_p)
          p = p_smem[...].astype(jnp.float32)
          plgpu.barrier_arrive(bar_pfree)
          # P is already 0 at invalid slots (WG0 masked it) and dP is finite there (row 0 was
          # fetched), so dS is 0 there without a mask of its own.
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
          acc = dq_step(acc, owners[w], z, slot)
        plgpu.barrier_arrive(bar_rfree.at[slot])
        plgpu.barrier_arrive(bar_dsfree)
        return acc

      for w in range(2):

        @pl.when(wg == w)
        def _(w=w):
          acc = pairs(lambda j, slot, acc, w=w: step(j, slot, acc, w), zeros_wgmma(owners[w]))
          plgpu.barrier_wait(bar_pfree if w == 0 else bar_dsfree)  # observe the last phase
          finish(acc, owners[w])

  def sparse_mla_bwd_kernel(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_ref, a_ref):
    def sw(shape):
      return plgpu.SMEM(shape, dtype, transforms=_SWIZZLE)

    bufs = (
      sw((q_tiles, HEAD_BLOCK, _TILE)),  # q, then the dq output tiles
      sw((do_tiles, HEAD_BLOCK, _TILE)),  # dO
      sw((2, bk, kp_dim)),  # R: two chunks' rows (two operand slots)
      sw((HEAD_BLOCK, bk)),  # P
      sw((HEAD_BLOCK, bk)),  # dS
      plgpu.SMEM((IDS_RING + 1, bk), jnp.int32),  # the ids ring, raw mbarriers
    )
    bars = (
      plgpu.Barrier(num_arrivals=q_tiles + do_tiles),  # q and dO tiles
      plgpu.Barrier(num_arrivals=1, num_barriers=IDS_RING),  # a ring slot's ids
      plgpu.Barrier(num_arrivals=bk, num_barriers=2) if interpret else None,  # interpreter rows
      plgpu.Barrier(num_arrivals=1),  # P in SMEM (WG0)
      plgpu.Barrier(num_arrivals=1),  # dS in SMEM (WG1)
      plgpu.Barrier(num_arrivals=2, num_barriers=2),  # a slot's R read by WG0 and WG1
      plgpu.Barrier(num_arrivals=1),  # P read by WG1
      plgpu.Barrier(num_arrivals=3),  # dS read (dq of all three WGs)
      plgpu.Barrier(num_arrivals=3),  # every WG past its last q read: dq may reuse q_smem
    )
    pl.run_scoped(
      lambda b, r: body(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_ref, a_ref, b, r),
      bufs,
      bars,
      collective_axes="wg",
    )

  out_type = (
    jax.ShapeDtypeStruct((n, hp, kp_dim), dtype),
    jax.ShapeDtypeStruct((n, 2 * hp, kp), dtype),
  )
  kern = fwd.token_kernel(sparse_mla_bwd_kernel, out_type, hp, n, 3, interpret)
  return kern(q, kv, idx3, do, lse2, delta)
