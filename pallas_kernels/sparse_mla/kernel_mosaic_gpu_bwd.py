# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Mosaic GPU (Hopper) sparse MLA backward: dq and dkv from the saved lse, one kernel.

Layout (ops.py folds the batch into rows exactly as for the forward, kernel_mosaic_gpu.py):
  q   [N, Hp, Kp]     N = B*T tokens, heads padded to 64s, row dim padded to 64s
  kv  [R, Kp]         R = B*S latent rows
  idx [N, kp]         int32 global row ids (b*S + s), -1 invalid, kp % 64 == 0
  do  [N, Hp, d_out]  dO, value columns zero-padded to d_out (a multiple of 128)
  lse, delta [N, Hp]  f32: the forward's lse (+inf on empty rows and padded heads) and
                      Δ - dlse with Δ = rowsum(O ∘ dO) (dlse zeroed where lse is not finite)
  -> dq [N, Hp, Kp] (q's dtype) and dkv [R, Kp] f32.

Per token t, head h, slot s with row r = kv[idx[t, s]] (invalid slots give P = 0):
  P = exp(scale·q·rᵀ - lse), dP = dO·r[:d_out]ᵀ, dS = scale·P∘(dP - delta),
  dq = Σ_s dS·r, dkv[idx_s] += Σ_h dS·q_h + P·dO_h (the latter on the first d_out columns).

One CTA = one token x 64 heads (grid: heads fastest, as the forward), three warpgroups (WG):
  WG0 and WG1 ("compute"), WG2 ("copy": gathers the rows and owns a third of dq).
q (Kp/64 tiles) and dO (d_out/64 tiles) stay in SMEM for the whole token. Per 64-slot chunk:
  1. WG2 gathers the chunk's rows into ONE swizzled wgmma operand R [64, Kp] with the forward's
     direct 16-byte cp.async pieces (kernel_mosaic_gpu._direct_ops; the interpreter uses Pallas
     row copies instead). The slot ids it needs are staged per chunk in SMEM (one TMA; the next
     chunk's ids are fetched while the current chunk is multiplied).
  2. WG0: S = q·Rᵀ -> P (bf16) into SMEM. WG1: dP = dO·R[:, :d_out]ᵀ, then with P from SMEM
     dS = scale·P∘(dP - delta) (bf16) into SMEM. The logits work is split, not duplicated.
  3. dq[:, tiles of WG w] += dS·R[:, tiles]: each of the three WGs keeps 1/3 of the dq column
     tiles in registers across chunks (at Kp = 576: 3 tiles = 96 f32 registers per thread).
     Three WGs = 384 threads, so ptxas gives each thread at most 168 registers (lab log,
     2026-11-29 fourth session): a 2-WG split of the 9 tiles (5 + 4 = 160 registers) cannot fit
     next to the 64 x 64 logits, hence the copy WG's share. Then R is free for the next chunk.
  4. dR tile c = dSᵀ·q[:, c] (+ Pᵀ·dO[:, c] for c < d_out/64), [64 slots, 64 columns] f32, one
     column tile at a time (32 registers) on WG0 / WG1 (alternating tiles), added into dkv.

dkv reduction: an f32 [R, Kp] buffer, zeroed by the wrapper and passed as a mutable Ref (the
kernel's aliased operand), receives every dR tile straight from registers with relaxed
`red.global.add.v4.f32` (inline Mosaic GPU): each thread owns two rows x 16 columns of a tile
in the WGMMA layout, i.e. 16 pairs of adjacent floats; one butterfly shuffle per column group
regroups them so that every red adds 4 adjacent floats (`red_schedule`); the ids of the rows
come from the idx array (GMEM, L2 hits) (`_red_add_op`). Invalid slots are sent to row 0: their dR rows are exact
zeros.
Why atomics: many tokens select the same row (and a row may repeat inside one token's list), so
the adds collide in unknown places; the alternatives cost more here:
  - TMA reduce-add (`copy_smem_to_gmem(..., reduction_op="add")`) needs an untiled f32 staging
    buffer ([64, 64] f32 = 16 KiB per WG) that does not fit next to q, dO and R (225 of 227 KiB
    are in use), and one TMA issue per row and column tile (576 per chunk at V3.2: the forward
    measured ~260 cycles per Pallas copy issue);
  - per-CTA partial rows + a second reduction pass writes B*T*k*Kp f32 (19 GB at S3);
  - an index inversion (sort the B*T*k ids, segment-sum) needs a second gather pass.
Atomics are not deterministic in the order of f32 adds (the XLA scatter is not either).
The second scheme is dkv="store": each dR tile is rounded to q's dtype and stored from
registers with `st.global.v2.b32` at its own rows (one row per head block, token and slot,
`_store_op`); ops.py sorts the slot ids by row and kernel_segment_sum_triton.py adds each row's
tiles once, without atomics, token block by token block (ops.GPU_BWD_DKV="sorted"). Its
traffic is one write and one read of the bf16 tiles (19.3 GB each way at S3) where the reds
read-modify-write f32 dkv rows in DRAM, which is most of the red kernel's time.
The interpreter has neither inline Mosaic GPU nor TMA reductions, so there the dR tiles go
through an f32 SMEM stage and are added row by row with plain loads/stores of the dkv Ref (the
interpreter runs the grid one CTA at a time and the two WGs own different column tiles).

SMEM at V3.2 (Kp 576, d_out 512, bf16): q 72 KiB + dO 64 + R 72 + P 8 + dS 8 + the chunk's ids
and the raw mbarriers 1 = 225 KiB (+ Pallas barriers) of 227. The dq output reuses q's tiles.
No double buffering of R (no room): the next chunk's copies overlap only with step 4.
"""

import functools
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
BLOCK_K = fwd.BLOCK_K
_SMEM_BYTES = fwd._SMEM_BYTES


def _kib(x):
  return -(-x // 1024) * 1024


def smem_bytes(kp_dim: int, d_out: int, itemsize: int) -> int:
  """SMEM the backward asks for (Mosaic GPU rounds every buffer up to whole KiB): q, dO and R
  tiles, P and dS tiles, the chunk's ids + raw mbarriers, and the Pallas barriers."""
  tile = HEAD_BLOCK * 64 * itemsize
  tiles = (2 * kp_dim // 64 + d_out // 64 + 2) * tile
  return _kib(tiles) + _kib(2 * BLOCK_K * 4) + 256


def tile_owners(n_tiles: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """dq column tiles of WG0, WG1, WG2: contiguous thirds (WG0 takes the remainder first)."""
  per = [n_tiles // 3 + (1 if w < n_tiles % 3 else 0) for w in range(3)]
  starts = np.cumsum([0] + per)
  return tuple(tuple(range(starts[w], starts[w + 1])) for w in range(3))


def red_schedule(v, row0, x, sel, shfl, cond):
  """Which 4 adjacent floats of a warp's 16 x 64 accumulator slab each red.v4 adds, and where.

  WGMMA layout, lane = 4·m + x: the lane holds v[h][g], the pair of floats at row row0 + 8h
  (row0 = the warp's first row + m), columns 8g + 2x + {0, 1}. Lanes x and x ^ 1 hold columns
  8g + 4(x >> 1) .. +3 of the same two rows between them; one butterfly shuffle per column group
  gives the even lane those 4 floats of row row0 and the odd lane those of row row0 + 8. Returns
  the lane's 8 reds as (row, column, (pair, pair)); a warp instruction covers 16 rows x 32 bytes.
  (Regrouping further so that an instruction covers 8 rows x 64 or 4 rows x 128 bytes measured
  the same at S3: lab log 2026-12-06.)
  sel(c, a, b): a where c else b; shfl(a, k): a from lane ^ k; cond(i): i != 0. row0, x are
  index-like (support +, *, &, >>) and are the same kind as the returned rows / columns.
  """
  xo, xh = x & 1, x >> 1
  odd = cond(xo)
  out = []
  for g in range(8):
    keep, recv = sel(odd, v[1][g], v[0][g]), shfl(sel(odd, v[0][g], v[1][g]), 1)
    out.append((row0 + xo * 8, xh * 4 + 8 * g, (sel(odd, recv, keep), sel(odd, keep, recv))))
  return out


class _Index:
  """An MLIR index value with the integer operators red_schedule uses."""

  def __init__(self, v):
    self.v = v

  @staticmethod
  def _of(x):
    from jax.experimental.mosaic.gpu import utils as mu  # noqa: PLC0415
    from jaxlib.mlir import ir  # noqa: PLC0415

    return x.v if isinstance(x, _Index) else mu.c(x, ir.IndexType.get())

  def _op(self, name, other):
    from jaxlib.mlir.dialects import arith  # noqa: PLC0415

    return _Index(getattr(arith, name)(self.v, self._of(other)))

  def __add__(self, o):
    return self._op("addi", o)

  __radd__ = __add__

  def __mul__(self, o):
    return self._op("muli", o)

  __rmul__ = __mul__

  def __and__(self, o):
    return self._op("andi", o)

  def __rshift__(self, o):
    return self._op("shrui", o)


def _tile_schedule(acc):
  """red_schedule on a [64, 64] f32 WGMMA-layout tile inside inline Mosaic GPU: this thread's
  (row, column, (pair, pair)) for each 4 adjacent floats, rows / columns as `_Index` values."""
  from jax.experimental.mosaic.gpu import utils as mu  # noqa: PLC0415
  from jaxlib.mlir import ir  # noqa: PLC0415
  from jaxlib.mlir.dialects import arith  # noqa: PLC0415

  index = ir.IndexType.get()
  regs = acc.registers
  if any(ir.VectorType(r.type).shape != [2] for r in regs.flat):
    raise NotImplementedError(f"expected vector<2xf32> registers, got {regs.flat[0].type}")
  idxs = dict(zip(np.ndindex(regs.shape), acc.layout.thread_idxs(acc.shape), strict=True))
  # registers [.., column group (8), .., row half (2), ..]: the two non-unit dims
  dims = [d for d, n in enumerate(regs.shape) if n > 1]
  if [regs.shape[d] for d in dims] != [8, 2]:
    raise NotImplementedError(f"unexpected WGMMA register shape {regs.shape}")
  d_col, d_row = dims

  def reg(h, g):
    return regs[tuple(g if d == d_col else (h if d == d_row else 0) for d in range(regs.ndim))]

  v = [[reg(h, g) for g in range(8)] for h in range(2)]
  row0, col = idxs[tuple(0 for _ in range(regs.ndim))]  # row0 = warp row + m, col = 2x
  zero = mu.c(0, index)
  return red_schedule(
    v,
    _Index(row0),
    _Index(arith.shrui(col, mu.c(1, index))),
    sel=arith.select,
    shfl=mu.shfl_bfly,
    cond=lambda i: arith.cmpi(arith.CmpIPredicate.ne, i.v, zero),
  )


def _red_add_op(kp_dim: int, col0: int):
  """Inline Mosaic GPU: dkv[ids[t, j, row], col0 + col] += acc[row, col] for a [64, 64] f32
  WGMMA-layout tile with relaxed `red.global.add.v4.f32`, 8 per thread in red_schedule's
  order. Ids < 0 go to row 0 (their rows are zeros). All id loads are emitted before the first
  red (the asm has side effects, so LLVM would not hoist loads past it).
  """
  from jax.experimental.mosaic.gpu import utils as mu  # noqa: PLC0415
  from jaxlib.mlir import ir  # noqa: PLC0415
  from jaxlib.mlir.dialects import arith, llvm, memref, vector  # noqa: PLC0415

  @plgpu.inline_mgpu(
    arg_types=(
      plgpu.RefType(),
      plgpu.RefType(),
      plgpu.Layout.WGMMA,
      plgpu.Layout.WG_SPLAT,
      plgpu.Layout.WG_SPLAT,
    )
  )
  def red_add(ctx, dkv, ids, acc, t, j):
    # ids is the whole [N, kp / 64, 64] GMEM array, indexed here (no sliced GMEM ref).
    del ctx
    i8, i32, i64 = (ir.IntegerType.get_signless(w) for w in (8, 32, 64))
    index = ir.IndexType.get()
    t, j = (arith.index_cast(index, fwd._scalar(x)) for x in (t, j))
    base = mu.memref_ptr(dkv)
    adds = []
    for row, c, pairs in _tile_schedule(acc):
      rid = arith.maxsi(memref.load(ids, [t, j, row.v]), mu.c(0, i32))
      elem = arith.addi(
        arith.muli(arith.extsi(i64, rid), mu.c(kp_dim, i64)),
        arith.addi(arith.index_cast(i64, c.v), mu.c(col0, i64)),
      )
      vals = [
        vector.extract(p, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([i]))
        for p in pairs
        for i in range(2)
      ]
      adds.append((mu.getelementptr(base, [arith.muli(elem, mu.c(4, i64))], i8), vals))
    for ptr, vals in adds:
      llvm.inline_asm(
        ir.Type.parse("!llvm.void"),
        [ptr, *vals],
        "red.relaxed.gpu.global.add.v4.f32 [$0], {$1, $2, $3, $4};",
        ",".join(["l"] + ["f"] * 4),
        has_side_effects=True,
      )

  return red_add


def _store_op(kp_dim: int, col0: int, kp: int, n: int, dtype):
  """Inline Mosaic GPU: dr[((hb * n + t) * kp + j * 64 + row), col0 + col] = acc[row, col]
  for a [64, 64] f32 WGMMA-layout tile, rounded to `dtype` (bf16 / f16): red_schedule's order,
  each 4 adjacent floats as two packed 16-bit pairs in one `st.global.v2.b32` (8 bytes, aligned:
  columns in steps of 4, rows of kp_dim 16-bit values)."""
  from jax.experimental.mosaic.gpu import utils as mu  # noqa: PLC0415
  from jaxlib.mlir import ir  # noqa: PLC0415
  from jaxlib.mlir.dialects import arith, llvm, vector  # noqa: PLC0415

  @plgpu.inline_mgpu(
    arg_types=(
      plgpu.RefType(),
      plgpu.Layout.WGMMA,
      plgpu.Layout.WG_SPLAT,
      plgpu.Layout.WG_SPLAT,
      plgpu.Layout.WG_SPLAT,
    )
  )
  def store(ctx, dr, acc, t, hb, j):
    del ctx
    i8, i32, i64 = (ir.IntegerType.get_signless(w) for w in (8, 32, 64))
    half = ir.BF16Type.get() if dtype == jnp.bfloat16 else ir.F16Type.get()
    t, hb, j = (arith.extsi(i64, fwd._scalar(x)) for x in (t, hb, j))
    base = mu.memref_ptr(dr)
    # first row of this (head block, token, chunk) in dr
    r0 = arith.muli(arith.addi(arith.muli(hb, mu.c(n, i64)), t), mu.c(kp, i64))
    r0 = arith.addi(r0, arith.muli(j, mu.c(64, i64)))
    pair_t, packed_t = ir.VectorType.get([2], half), ir.VectorType.get([1], i32)
    for row, c, pairs in _tile_schedule(acc):
      r = arith.addi(r0, arith.index_cast(i64, row.v))
      elem = arith.addi(
        arith.muli(r, mu.c(kp_dim, i64)), arith.addi(arith.index_cast(i64, c.v), mu.c(col0, i64))
      )
      words = [
        vector.extract(
          vector.bitcast(packed_t, arith.truncf(pair_t, p)),
          dynamic_position=[],
          static_position=ir.DenseI64ArrayAttr.get([0]),
        )
        for p in pairs
      ]
      ptr = mu.getelementptr(base, [arith.muli(elem, mu.c(2, i64))], i8)
      llvm.inline_asm(
        ir.Type.parse("!llvm.void"),
        [ptr, *words],
        "st.global.v2.b32 [$0], {$1, $2};",
        "l,r,r",
        has_side_effects=True,
      )

  return store


def sparse_mla_bwd(
  q,
  kv,
  idx,
  do,
  lse,
  delta,
  *,
  scale: float,
  dkv: str = "red",
  interpret=False,
):
  """q [N,Hp,Kp], kv [R,Kp], idx [N,kp], do [N,Hp,d_out], lse/delta [N,Hp] -> dq [N,Hp,Kp]
  (q.dtype) and, with dkv="red", dkv [R,Kp] f32 (the dR tiles added with reds); with
  dkv="store", dr [Hp/64 * N * kp, Kp] (q.dtype): every dR tile stored at its own rows
  ((head block * N + t) * kp + slot: one group of N * kp rows per head block), for a sorted
  segment sum to add up (kernel_segment_sum_triton.py); rows of invalid slots are zeros. See the module docstring;
  the shape rules are the forward's. The interpreter has neither reds nor the inline stores (it
  adds / writes the tiles with plain Pallas stores), so only a GPU checks them.
  """
  n, hp, kp_dim = q.shape
  kp = idx.shape[1]
  d_out = do.shape[-1]
  bk = BLOCK_K
  if hp % HEAD_BLOCK or kp_dim % 64 or kp % bk or d_out % 128 or d_out > kp_dim:
    raise ValueError(f"bad kernel layout: q {q.shape}, idx {idx.shape}, do {do.shape}")
  if do.shape[:2] != (n, hp) or lse.shape != (n, hp) or delta.shape != (n, hp):
    raise ValueError(f"bad shapes: q {q.shape}, do {do.shape}, lse {lse.shape}, {delta.shape}")
  need = smem_bytes(kp_dim, d_out, q.dtype.itemsize)
  if need > _SMEM_BYTES and not interpret:
    raise ValueError(f"the backward needs {need} of {_SMEM_BYTES} bytes of SMEM at Kp={kp_dim}")
  if dkv not in ("red", "store"):
    raise ValueError(f"dkv={dkv!r}; expected 'red' or 'store'")
  n_chunks = kp // bk
  n_hb = hp // HEAD_BLOCK
  n_tiles = kp_dim // 64
  do_tiles = d_out // 64
  dtype = q.dtype
  qk_scale = scale * _LOG2E
  owners = tile_owners(n_tiles)
  dr_tiles = (tuple(range(0, n_tiles, 2)), tuple(range(1, n_tiles, 2)))  # WG0 / WG1
  idx3 = idx.reshape(n, n_chunks, bk)
  lse2 = lse * _LOG2E
  oob = plgpu.OOBFillMode.PROMISE_IN_BOUNDS
  if not interpret:
    direct_init, direct_issue, mbarrier_wait = fwd._direct_ops(bk, kp_dim * q.dtype.itemsize)
    if dkv == "red":
      red_ops = {c: _red_add_op(kp_dim, c * 64) for c in range(n_tiles)}
    else:
      store_ops = {c: _store_op(kp_dim, c * 64, kp, n, q.dtype) for c in range(n_tiles)}

  def zeros_wgmma(cols=64):
    return plgpu.layout_cast(jnp.zeros((HEAD_BLOCK, cols), jnp.float32), plgpu.Layout.WGMMA)

  def body(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, dkv_ref, dq_ref, bufs, bars):
    q_smem, do_smem, r_smem, p_smem, ds_smem, misc, stage = bufs
    bar_q, bar_idx, bar_full, bar_p, bar_ds, bar_rfree, bar_pfree, bar_dsfree, bar_end = bars
    # misc (int32): row 0 the chunk's slot ids (the copy WG's), row 1 [:4] the raw mbarriers.
    ids_smem, raw_bars = misc.at[0], misc.at[1, pl.ds(0, 4)]
    t = lax.axis_index("t")
    hb = lax.axis_index("h")
    wg = lax.axis_index("wg")
    heads = pl.ds(hb * HEAD_BLOCK, HEAD_BLOCK)
    operand = r_smem

    def wait_rows(j):
      """The chunk's rows have landed in R (each waiting WG tracks the phases itself)."""
      if interpret:
        plgpu.barrier_wait(bar_full)
      else:
        mbarrier_wait(raw_bars.at[pl.ds(0, 2)], j % 2)
        plgpu.commit_smem()  # the cp.async writes (generic proxy) before wgmma reads them

    def dq_step(accs, tiles):
      return tuple(
        fwd.mma_add(acc, ds_smem, operand.at[:, pl.ds(c * 64, 64)], interpret)
        for acc, c in zip(accs, tiles)
      )

    def finish(accs, tiles):
      """All WGs past their last read of q_smem: write this WG's dq tiles through it."""
      plgpu.barrier_arrive(bar_end)
      plgpu.barrier_wait(bar_end)
      for acc, c in zip(accs, tiles):
        q_smem.at[c][...] = acc.astype(dtype)
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
      plgpu.copy_gmem_to_smem(idx_ref.at[t, 0], ids_smem, bar_idx, oob_mode=oob)
      plgpu.barrier_wait(bar_q)  # the raw mbarriers are set up (WG2 reads no q)

      def issue(j):
        plgpu.barrier_wait(bar_idx)
        if interpret:  # Pallas row copies (the interpreter has no inline Mosaic GPU)
          rows = [jnp.maximum(ids_smem[i], 0) for i in range(bk)]
          for i, row in enumerate(rows):
            dst = r_smem.at[pl.ds(i, 1)]
            plgpu.copy_gmem_to_smem(kv_ref.at[pl.ds(row, 1)], dst, bar_full)
        else:
          direct_issue(kv_ref, r_smem, ids_smem, raw_bars, 0)

      def step(j, accs):
        @pl.when(j > 0)
        def _():
          plgpu.barrier_wait(bar_rfree)  # WG0/WG1 are done with chunk j-1's rows

        issue(j)
        plgpu.barrier_wait(bar_ds)
        wait_rows(j)  # also a warpgroup barrier: every thread has read the chunk's ids

        @pl.when(j + 1 < n_chunks)
        def _():  # the ids were read at issue: fetch the next chunk's
          nxt = jnp.minimum(j + 1, n_chunks - 1)
          plgpu.copy_gmem_to_smem(idx_ref.at[t, nxt], ids_smem, bar_idx, oob_mode=oob)

        accs = dq_step(accs, owners[2])
        plgpu.barrier_arrive(bar_dsfree)
        return accs

      accs = tuple(zeros_wgmma() for _ in owners[2])
      accs = lax.fori_loop(0, n_chunks, step, accs)
      plgpu.barrier_wait(bar_rfree)  # observe every phase (the interpreter checks)
      finish(accs, owners[2])

    @pl.when(wg < 2)
    def _compute_wg():
      plgpu.barrier_wait(bar_q)
      lse_h = plgpu.load(lse_ref.at[t, heads], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
      delta_h = plgpu.load(
        delta_ref.at[t, heads], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False
      )

      def logits(src, k_tiles):
        def scope(acc_ref):
          for c in range(k_tiles):
            plgpu.wgmma(acc_ref, src.at[c], operand.at[:, pl.ds(c * 64, 64)].T)
          return acc_ref[...]

        return pl.run_scoped(scope, plgpu.ACC((HEAD_BLOCK, bk), jnp.float32))

      def drows(j, tiles):
        """dR tiles of this WG -> dkv (see the module docstring)."""
        for c in tiles:

          def scope(acc_ref, c=c):
            plgpu.wgmma(acc_ref, ds_smem.T, q_smem.at[c])
            if c < do_tiles:
              plgpu.wgmma(acc_ref, p_smem.T, do_smem.at[c])
            return acc_ref[...]

          acc = pl.run_scoped(scope, plgpu.ACC((bk, 64), jnp.float32))
          if dkv == "store":
            if interpret:
              rows = pl.ds((hb * n + t) * kp + j * bk, bk)
              dkv_ref.at[rows, pl.ds(c * 64, 64)][...] = acc.astype(dtype)
            else:
              store_ops[c](dkv_ref, acc, t, hb, j)
          elif interpret:
            st = stage.at[wg]
            st[...] = acc

            @pl.loop(0, bk)
            def _(i):
              row = jnp.maximum(idx_ref[t, j, i], 0)
              dst = dkv_ref.at[pl.ds(row, 1), pl.ds(c * 64, 64)]
              dst[...] = dst[...] + st.at[pl.ds(i, 1)][...]
          else:
            red_ops[c](dkv_ref, idx_ref, acc, t, j)

      def step(j, accs, w):
        wait_rows(j)
        ids = plgpu.load(idx_ref.at[t, j], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
        valid = lax.broadcast_in_dim(ids >= 0, (HEAD_BLOCK, bk), [1])
        if w == 0:
          s = logits(q_smem, n_tiles)
          p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(lse_h, s.shape, [0]))
          p = jnp.where(valid, p, 0.0)

          @pl.when(j > 0)
          def _():
            plgpu.barrier_wait(bar_pfree)  # both WGs' chunk j-1 dR tiles read p_smem

          p_smem[...] = p.astype(dtype)
          plgpu.commit_smem()
          plgpu.barrier_arrive(bar_p)
          plgpu.barrier_wait(bar_ds)
        else:
          dp = logits(do_smem, do_tiles)
          plgpu.barrier_wait(bar_p)
          p = p_smem[...].astype(jnp.float32)
          ds = scale * p * (dp - lax.broadcast_in_dim(delta_h, dp.shape, [0]))
          ds = jnp.where(valid, ds, 0.0)

          @pl.when(j > 0)
          def _():
            plgpu.barrier_wait(bar_dsfree)  # chunk j-1's dS read by all three WGs

          ds_smem[...] = ds.astype(dtype)
          plgpu.commit_smem()
          plgpu.barrier_arrive(bar_ds)
        accs = dq_step(accs, owners[w])
        plgpu.barrier_arrive(bar_rfree)
        drows(j, dr_tiles[w])
        plgpu.barrier_arrive(bar_dsfree)
        plgpu.barrier_arrive(bar_pfree)
        return accs

      for w in range(2):

        @pl.when(wg == w)
        def _(w=w):
          accs = tuple(zeros_wgmma() for _ in owners[w])
          accs = lax.fori_loop(0, n_chunks, functools.partial(step, w=w), accs)
          plgpu.barrier_wait(bar_pfree if w == 0 else bar_dsfree)  # observe the last phase
          finish(accs, owners[w])

  def sparse_mla_bwd_kernel(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, dkv_ref, dq_ref):
    sw = fwd._swizzled
    bufs = (
      sw((n_tiles, HEAD_BLOCK, 64), dtype),  # q, then the dq output tiles
      sw((do_tiles, HEAD_BLOCK, 64), dtype),  # dO
      sw((bk, kp_dim), dtype),  # R: the chunk's rows (one operand slot)
      sw((HEAD_BLOCK, bk), dtype),  # P
      sw((HEAD_BLOCK, bk), dtype),  # dS
      plgpu.SMEM((2, bk), jnp.int32),  # the chunk's ids, raw mbarriers
      plgpu.SMEM((2, bk, 64), jnp.float32) if interpret else None,  # dR stage (interpreter)
    )
    bars = (
      plgpu.Barrier(num_arrivals=n_tiles + do_tiles),  # q and dO tiles
      plgpu.Barrier(num_arrivals=1),  # the chunk's ids
      plgpu.Barrier(num_arrivals=bk) if interpret else None,  # rows (interpreter's copies)
      plgpu.Barrier(num_arrivals=1),  # P in SMEM (WG0)
      plgpu.Barrier(num_arrivals=1),  # dS in SMEM (WG1)
      plgpu.Barrier(num_arrivals=2),  # R read by WG0 and WG1 (logits and dq)
      plgpu.Barrier(num_arrivals=2),  # P read (dR tiles of WG0, WG1)
      plgpu.Barrier(num_arrivals=3),  # dS read (dq of all, dR of WG0, WG1)
      plgpu.Barrier(num_arrivals=3),  # every WG past its last q read: dq may reuse q_smem
    )
    pl.run_scoped(
      lambda b, r: body(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, dkv_ref, dq_ref, b, r),
      bufs,
      bars,
      collective_axes="wg",
    )

  out_type = jax.ShapeDtypeStruct((n, hp, kp_dim), dtype)
  if dkv == "store":  # dr is a second output (no zero fill: every row is written)
    dr_type = jax.ShapeDtypeStruct((n_hb * n * kp, kp_dim), dtype)

    def store_entry(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_ref, dr_ref):
      sparse_mla_bwd_kernel(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, dr_ref, dq_ref)

    kern = fwd.token_kernel(store_entry, (out_type, dr_type), hp, n, 3, interpret)
    return kern(q, kv, idx3, do, lse2, delta)
  kern = fwd.token_kernel(sparse_mla_bwd_kernel, out_type, hp, n, 3, interpret)
  dkv_ref = jax.new_ref(jnp.zeros((kv.shape[0], kp_dim), jnp.float32))
  dq = kern(q, kv, idx3, do, lse2, delta, dkv_ref)
  return dq, jax.freeze(dkv_ref)
