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
_SWIZZLE = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # wgmma operands


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
  return plgpu.SMEM(shape, dtype, transforms=_SWIZZLE)


def _masked_logits(s, ids, qk_scale):
  """Base-2 logits of a chunk: s [64, bk] * scale * log2(e), slots with ids < 0 at -inf."""
  return jnp.where(lax.broadcast_in_dim(ids >= 0, s.shape, [1]), s * qk_scale, -jnp.inf)


def _softmax_update(s, m_i, m_new, l_i):
  """(alpha = rescale of the old accumulator, p = exp2(s - m_new), l_new) of masked logits s
  under the new running max m_new >= m_i."""
  m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all-invalid so far: keep exp finite
  alpha = jnp.exp2(m_i - m_use)
  p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
  return alpha, p, l_i * alpha + p.sum(axis=1)


def _online_softmax(s, ids, m_i, l_i, qk_scale):
  """One chunk of the base-2 online softmax: logits s [64, bk] (slots with ids < 0 masked) ->
  (m_new, alpha, p, l_new)."""
  s = _masked_logits(s, ids, qk_scale)
  m_new = jnp.maximum(m_i, s.max(axis=1))
  return (m_new, *_softmax_update(s, m_i, m_new, l_i))


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
      m_new, alpha, p, l_i = _online_softmax(s, ids, m_i, l_i, qk_scale)
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


# ---------------------------------------------------------------------------------------------
# Warp-specialised forward (the product path of the sparse MLA issue; layout as above, no value
# split across CTAs).
#
# One CTA = one token x 64 heads, 2 + copy_wgs warpgroups (WG). Default (`direct`):
#   copy WG     issues 16-byte cp.async pieces of the next chunk's 64 rows straight into the
#               free slot of a double-buffered, swizzled wgmma operand (it computes the swizzle
#               itself), reading the slot ids from SMEM (one TMA of the token's idx row);
#   compute WGs each compute the whole 64 x 64 logits tile of the chunk (duplicated: `pairs`
#               splits it, measured slower under ptxas' 168-register cap) and P·V for their half
#               of the value columns, so a token's rows are gathered once per 64 heads and each
#               WG holds a 64 x 256 f32 accumulator.
# SMEM: q 72 KiB + two operand slots 2 x 72 KiB + the idx row (8 KiB at k = 2048) of 227 KiB.
# Without `direct` (the fallback for idx rows over the SMEM budget, and older variants): the
# copy WGs land whole rows in an untiled stage (lane copies: one `cp.async.bulk` per thread, or
# Pallas copies) and the compute WGs re-lay it out into a single operand buffer.
# The q tile is reused for the output once both WGs have finished their last logits.


@dataclasses.dataclass(frozen=True)
class WsBlockSizes:
  """copy_wgs: warpgroups issuing the row copies (1, 2 or 4; each issues 64 / copy_wgs per
  chunk: one thread issues a copy after the other, so more WGs issue more copies at once).
  idx_in_smem: stage the token's slot ids in SMEM (else read from GMEM; Pallas copies only).
  no_auto_barriers: plgpu's unsafe_no_auto_barriers (drops the warpgroup barrier Pallas puts
  around every copy and SMEM store; the kernel orders its SMEM traffic with mbarriers).
  bulk_copies: promise the copies in bounds (the wrapper guarantees it), so each is one plain
  `cp.async.bulk` of a contiguous row instead of a tensor-map TMA with out-of-bounds clamping.
  lane_copies: each copy WG issues its rows from as many threads at once (one row per thread,
  inline Mosaic GPU) with one barrier arrival per WG, instead of one copy after the other from
  a single thread with a 128-thread barrier arrival per copy (Pallas' copy_gmem_to_smem).
  split_qk: each compute WG computes the logits of half the slots only (no duplicated q·kᵀ);
  the WGs swap row maxima and their bf16 P halves through SMEM, and each rebuilds the whole
  64 x 64 P in registers (P·V needs K = 64). Needs idx_in_smem=False (SMEM for the exchange),
  hence lane_copies=False. Measured slower (WORKSPACE).
  direct: each copy-WG thread issues 16-byte `cp.async` pieces of the rows straight into the
  tiled + swizzled operand (it computes the swizzled address itself, as FlashMLA's producer
  does): no stage, no relayout, and the SMEM the stage took double-buffers the operand, so the
  copies of chunk j+1 land while chunk j is multiplied. Needs idx_in_smem, no split_qk.
  pairs (needs direct): no duplicated logits (FlashMLA's split). The WGs take the two operand
  slots' chunks in turn (WG w: the logits of chunk 2i + w), agree on one running max through
  SMEM, and each computes P·V for its value half over both chunks, reading both P tiles from
  SMEM. The P tiles live in the operand's last column tile (rope dims: not a value column, and
  dead after the logits), so it needs Kp - d_out >= 64 and an even number of chunks.
  probe_no_math: profiling only (wrong results): copies and relayouts without the matmuls.
  """

  copy_wgs: int = 1
  lane_copies: bool = True
  split_qk: bool = False
  idx_in_smem: bool = True
  no_auto_barriers: bool = False
  bulk_copies: bool = True
  direct: bool = True
  pairs: bool = False
  probe_no_math: bool = False

  def __post_init__(self):
    if self.pairs and not self.direct:
      raise ValueError("pairs=True needs direct=True")
    if self.direct and (self.split_qk or not self.idx_in_smem):
      raise ValueError("direct=True needs idx_in_smem=True and split_qk=False")
    if self.split_qk and self.idx_in_smem:
      raise ValueError("split_qk needs idx_in_smem=False (SMEM for the exchange buffers)")
    if self.lane_copies and not self.idx_in_smem:
      # Lane copies reading the ids from GMEM crashed on the H200 ("unspecified launch
      # failure", WORKSPACE 2026-11-29 third session); they read them from SMEM only.
      raise ValueError("lane_copies=True needs idx_in_smem=True (or set lane_copies=False)")
    if self.copy_wgs not in (1, 2, 4):
      raise ValueError(f"copy_wgs={self.copy_wgs} must be 1, 2 or 4")

  @property
  def registers(self) -> tuple[int, int]:
    """(compute, copy) registers per thread after setmaxnreg. The CTA keeps the registers it was
    launched with (64K / threads per thread, in steps of 8), so 2 * compute + copy_wgs * copy
    must fit in that pool or the increase waits forever (6 WGs: 80 each, not 85)."""
    wgs = 2 + self.copy_wgs
    pool = 65536 // (128 * wgs) // 8 * 8 * wgs
    # direct: FlashMLA's producer/consumer split (72 / 216); the others' copy WGs need few.
    copy = 24 if self.copy_wgs == 4 else (72 if self.direct else 40)
    return (pool - self.copy_wgs * copy) // 2 // 8 * 8, copy


WS_BLOCK_K = 64


def _lane_ops(n_rows: int, row_bytes: int, arrivals: int):
  """Inline Mosaic GPU ops on a raw SMEM mbarrier (Pallas barriers cannot be passed to
  inline_mgpu): (init, issue, wait).

  init: one thread sets the barrier up for `arrivals` thread arrivals per phase.
  issue: thread i < n_rows of the warpgroup copies row max(ids[i], 0) of kv into row i of the
  stage with one `cp.async.bulk`; all 128 threads arrive once with their share of the bytes.
  wait: waits for the phase of the given parity (the loop index's low bit).
  """
  from jax._src.lib.mlir import ir  # noqa: PLC0415
  from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, nvvm  # noqa: PLC0415
  from jax.experimental.mosaic.gpu import utils as mu  # noqa: PLC0415

  if (n_rows * row_bytes) % 128:
    raise ValueError(f"{n_rows} rows of {row_bytes} bytes do not split over 128 threads")

  def types():
    return tuple(ir.IntegerType.get_signless(w) for w in (8, 32, 64))

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
  def init(ctx, bar):
    del ctx
    _, i32, _ = types()
    pred = mu.single_thread_predicate(scope=mu.ThreadSubset.BLOCK)
    nvvm.mbarrier_init(mu.memref_ptr(bar), mu.c(arrivals, i32), predicate=pred)
    nvvm.fence_mbarrier_init()

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 4)
  def issue(ctx, kv, stage, ids, bar):
    del ctx
    i8, i32, i64 = types()
    index = ir.IndexType.get()
    lane = arith.remui(gpu.thread_id(gpu.Dimension.x), mu.c(128, index))
    active = arith.cmpi(arith.CmpIPredicate.ult, lane, mu.c(n_rows, index))
    slot = arith.minui(lane, mu.c(n_rows - 1, index))
    row = arith.maxsi(memref.load(ids, [slot]), mu.c(0, i32))  # invalid slots fetch row 0
    src = mu.getelementptr(
      mu.memref_ptr(kv), [arith.muli(arith.extsi(i64, row), mu.c(row_bytes, i64))], i8
    )
    dst_off = arith.muli(arith.index_cast(i32, slot), mu.c(row_bytes, i32))
    dst = mu.getelementptr(mu.memref_ptr(stage), [dst_off], i8)
    bar_ptr = mu.memref_ptr(bar)
    nvvm.mbarrier_arrive_expect_tx(bar_ptr, mu.c(n_rows * row_bytes // 128, i32))
    llvm.inline_asm(
      ir.Type.parse("!llvm.void"),
      [active, dst, src, mu.c(row_bytes, i32), bar_ptr],
      "@$0 cp.async.bulk.shared::cta.global.mbarrier::complete_tx::bytes [$1], [$2], $3, [$4];",
      "b,l,l,r,l",
      has_side_effects=True,
    )

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.Layout.WG_SPLAT))
  def wait(ctx, bar, parity):
    del ctx
    _, i32, _ = types()
    nvvm.mbarrier_try_wait_parity(mu.memref_ptr(bar), _scalar(parity), mu.c(10000000, i32))

  return init, issue, wait


def _scalar(x):
  """The one register of a WG_SPLAT argument of inline_mgpu."""
  from jax._src.lib.mlir import ir  # noqa: PLC0415
  from jax._src.lib.mlir.dialects import vector  # noqa: PLC0415

  if not isinstance(x, ir.Value):  # a splat FragmentedArray
    x = x.registers.flat[0]
  if isinstance(x.type, ir.VectorType):
    x = vector.extract(x, [], [0])
  return x


def _direct_ops(n_rows: int, row_bytes: int):
  """Inline Mosaic GPU (init, issue) for `WsBlockSizes.direct`: the rows land straight in the
  tiled + swizzled wgmma operand.

  The operand [2, n_rows, row_bytes / 2] bf16 is stored as 1 KiB tiles of 8 rows x 128 bytes
  (row tile major, then column tile), and the 128-byte swizzle XORs a 16-byte piece's index
  with the row's index inside its tile (PTX ISA, wgmma shared memory layouts). Thread i of the
  copy WG, in group g = i / 8 of 8 threads, copies piece i % 8 of every 128-byte line of rows
  g, g + 16, ...: those rows share g % 8, so the swizzled destination is one per-thread base
  plus compile-time offsets, and a group writes whole 128-byte lines. The slot ids are read
  once per chunk. `.L2::256B` asks L2 for the whole 256-byte span a group's next lines need.
  Each thread then makes the slot's raw mbarrier track its copies
  (`cp.async.mbarrier.arrive.noinc`): a phase completes when all 128 threads' pieces landed.
  """
  from jax._src.lib.mlir import ir  # noqa: PLC0415
  from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, nvvm  # noqa: PLC0415
  from jax.experimental.mosaic.gpu import utils as mu  # noqa: PLC0415

  tiles = row_bytes // 128
  if row_bytes % 128 or n_rows % 16:
    raise ValueError(f"{n_rows} rows of {row_bytes} bytes do not tile over 16 groups")
  buf_bytes = n_rows * row_bytes

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
  def init(ctx, bars):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    i8 = ir.IntegerType.get_signless(8)
    pred = mu.single_thread_predicate(scope=mu.ThreadSubset.BLOCK)
    for slot in range(2):
      bar = mu.getelementptr(mu.memref_ptr(bars), [8 * slot], i8)
      nvvm.mbarrier_init(bar, mu.c(128, i32), predicate=pred)
    nvvm.fence_mbarrier_init()

  @plgpu.inline_mgpu(
    arg_types=(
      plgpu.RefType(),
      plgpu.RefType(transforms=_SWIZZLE),
      plgpu.RefType(),
      plgpu.RefType(),
      plgpu.Layout.WG_SPLAT,
    )
  )
  def issue(ctx, kv, bufs, ids, bars, slot):
    del ctx
    i8, i32, i64 = (ir.IntegerType.get_signless(w) for w in (8, 32, 64))
    index = ir.IndexType.get()

    def c(v, t=i32):
      return mu.c(v, t)

    lane = arith.index_cast(i32, arith.remui(gpu.thread_id(gpu.Dimension.x), mu.c(128, index)))
    g, p = arith.shrui(lane, c(3)), arith.andi(lane, c(7))
    g8 = arith.andi(g, c(7))
    slot = _scalar(slot)
    base = arith.addi(
      arith.addi(arith.muli(slot, c(buf_bytes)), arith.muli(arith.shrui(g, c(3)), c(tiles * 1024))),
      arith.addi(arith.muli(g8, c(128)), arith.shli(arith.xori(p, g8), c(4))),
    )
    dst = mu.getelementptr(mu.memref_ptr(bufs), [base], i8)
    src = mu.getelementptr(mu.memref_ptr(kv), [arith.extui(i64, arith.shli(p, c(4)))], i8)
    bar_ptr = mu.getelementptr(mu.memref_ptr(bars), [arith.muli(slot, c(8))], i8)
    rows = []
    for k in range(n_rows // 16):
      rid = memref.load(ids, [arith.index_cast(index, arith.addi(g, c(16 * k)))])
      rid = arith.maxsi(rid, c(0))  # invalid slots fetch row 0 (masked in the logits)
      rows.append(arith.muli(arith.extsi(i64, rid), c(row_bytes, i64)))
    for k, row in enumerate(rows):
      row_src = mu.getelementptr(src, [row], i8)
      for tile in range(tiles):
        llvm.inline_asm(
          ir.Type.parse("!llvm.void"),
          [
            mu.getelementptr(dst, [(2 * k * tiles + tile) * 1024], i8),
            mu.getelementptr(row_src, [tile * 128], i8),
          ],
          "cp.async.cg.shared.global.L2::256B [$0], [$1], 16;",
          "l,l",
          has_side_effects=True,
        )
    llvm.inline_asm(
      ir.Type.parse("!llvm.void"),
      [bar_ptr],
      "cp.async.mbarrier.arrive.noinc.shared::cta.b64 [$0];",
      "l",
      has_side_effects=True,
    )

  return init, issue


_SMEM_BYTES = 232448  # Hopper's opt-in maximum per CTA


def ws_smem_bytes(kp_dim: int, kp: int, itemsize: int, idx_in_smem: bool) -> int:
  """SMEM the warp-specialised forward asks for: three 64-row tiles (q + stage + operand, or
  q + two operands), the idx row, the misc rows and the barriers."""
  return 3 * 64 * kp_dim * itemsize + (4 * kp if idx_in_smem else 0) + 4 * 4 * HEAD_BLOCK + 128


def sparse_mla_fwd_ws(q, kv, idx, *, scale: float, d_out: int, bs: WsBlockSizes, interpret=False):
  """q [N,Hp,Kp], kv [R,Kp], idx [N,kp] -> out [N,Hp,d_out] (value dims first), lse [N,Hp].

  Needs Hp % 64 == 0, Kp % 64 == 0, kp % 64 == 0, d_out % 128 == 0 and d_out <= Kp. The SMEM
  q tile is stored as [Kp/64, 64, 64] column tiles (each contiguous: the output reuses it, and
  TMA stores need contiguous SMEM).
  """
  n, hp, kp_dim = q.shape
  kp = idx.shape[1]
  bk = WS_BLOCK_K
  if hp % HEAD_BLOCK or kp_dim % 64 or kp % bk or d_out % 128 or d_out > kp_dim:
    raise ValueError(f"bad kernel layout: q {q.shape}, idx {idx.shape}, d_out={d_out}")
  if bs.idx_in_smem and kp // bk > 256:
    raise ValueError(f"idx_in_smem needs k <= {256 * bk} slots (one TMA box), got {kp}")
  n_chunks = kp // bk
  n_tiles = kp_dim // 64
  p_col = (n_tiles - 1) * 64  # pairs: the P tiles' columns (the last, a rope tile)
  v_tiles = d_out // 128  # value-column tiles per compute WG
  per_copy = bk // bs.copy_wgs
  dtype = q.dtype
  qk_scale = scale * _LOG2E
  idx3 = idx.reshape(n, n_chunks, bk)  # one 2-D TMA box per token (<= 256 per dimension)
  oob = plgpu.OOBFillMode.PROMISE_IN_BOUNDS if bs.bulk_copies else None
  # Lane ops: the lane copies, and the raw-mbarrier wait of the direct copies on hardware.
  if (bs.lane_copies and not bs.direct) or (bs.direct and not interpret):
    if interpret:
      raise ValueError("lane_copies needs a GPU (inline Mosaic GPU has no interpreter)")
    lane_init, lane_issue, lane_wait = _lane_ops(
      per_copy, kp_dim * q.dtype.itemsize, 128 * bs.copy_wgs
    )
  if bs.pairs and (n_chunks % 2 or kp_dim - d_out < 64):
    raise ValueError(
      f"pairs needs an even number of 64-slot chunks and a free column tile: k={kp}, "
      f"Kp={kp_dim}, d_out={d_out}"
    )
  if bs.direct:
    if bs.copy_wgs != 1:
      raise ValueError(f"direct=True issues from one copy warpgroup, got copy_wgs={bs.copy_wgs}")
    if not interpret:
      direct_init, direct_issue = _direct_ops(bk, kp_dim * q.dtype.itemsize)

  def relayout(stage, kv_smem, r0):
    # Row halves: a row range of the untiled stage is contiguous (a column range is not, and
    # the untiled load assumes contiguity).
    rows = pl.ds(r0, bk // 2)
    layout = plgpu.Layout.SMEM_GMEM_COPY((bk // 2, kp_dim), dtype, 128)
    kv_smem.at[rows][...] = plgpu.load(stage.at[rows], layout=layout, optimized=False)

  def body(q_ref, kv_ref, idx_ref, o_ref, lse_ref, bufs, bars):
    q_smem, stage, kv_smem, idx_smem, p_smem, pbufs, misc = bufs
    # misc rows (every SMEM buffer takes whole KiB, so the small ones share one): 0-1 the
    # split_qk row maxima / sums, 2 the lse tile, 3[:2] the lane copies' raw mbarrier (8 bytes),
    # 3[:4] direct's two (one per operand slot).
    xbuf, lse_smem, lane_bar = misc.at[pl.ds(0, 2)], misc.at[2], misc.at[3, pl.ds(0, 2)]
    raw_bars = misc.at[3, pl.ds(0, 4)]
    bar_in, bar_full, bar_relaid, bar_free, bar_x, bar_p = bars
    # pairs: bar_p[w] / bar_x[w] = WG w posted its max / its P tile; bar_end ends the loop.
    bar_end = bar_relaid
    # direct: kv_smem is [2, bk, Kp] (two operand slots; no stage), bar_full and bar_free hold
    # one barrier per slot (bar_full: the interpreter's Pallas copies only), bar_x ends the loop.
    t = lax.axis_index("t")
    hb = lax.axis_index("h")
    wg = lax.axis_index("wg")
    heads = pl.ds(hb * HEAD_BLOCK, HEAD_BLOCK)
    ids_ref = idx_smem if bs.idx_in_smem else idx_ref.at[t]

    @pl.when(wg == 0)
    def _():
      if bs.direct and not interpret:  # before the idx copy: its barrier orders the init
        direct_init(raw_bars)
      elif bs.lane_copies:  # before the idx copy: its barrier orders the init for every WG
        lane_init(lane_bar)
      for c in range(n_tiles):
        plgpu.copy_gmem_to_smem(q_ref.at[t, heads, pl.ds(c * 64, 64)], q_smem.at[c], bar_in[0])
      if bs.idx_in_smem:
        plgpu.copy_gmem_to_smem(idx_ref.at[t], idx_smem, bar_in[1], oob_mode=oob)

    @pl.when(wg >= 2)
    def _copy_wg():
      if not interpret:
        plgpu.set_max_registers(bs.registers[1], action="decrease")
      if bs.idx_in_smem:
        plgpu.barrier_wait(bar_in[1])
      first = (wg - 2) * per_copy

      if bs.direct:

        def issue_direct(j):
          slot = j % 2
          if interpret:  # Pallas row copies (the interpreter has no inline Mosaic GPU)
            for i in range(bk):
              row = jnp.maximum(ids_ref[j, i], 0)
              dst = kv_smem.at[slot, pl.ds(i, 1)]
              plgpu.copy_gmem_to_smem(kv_ref.at[pl.ds(row, 1)], dst, bar_full.at[slot])
          else:
            direct_issue(kv_ref, kv_smem, ids_ref.at[j], raw_bars, slot)

        issue_direct(0)
        if n_chunks > 1:
          issue_direct(1)

        @pl.loop(2, n_chunks)
        def _(j):
          plgpu.barrier_wait(bar_free.at[j % 2])  # both compute WGs are done with chunk j-2
          issue_direct(j)

        return

      def issue(j):
        if bs.lane_copies:
          rows_src = ids_ref.at[j, pl.ds(first, per_copy)]
          lane_issue(kv_ref, stage.at[pl.ds(first, per_copy)], rows_src, lane_bar)
          return
        # Invalid slots fetch row 0; the compute WGs mask them in the logits.
        rows = [jnp.maximum(ids_ref[j, first + i], 0) for i in range(per_copy)]
        for i, r in enumerate(rows):
          dst = stage.at[pl.ds(first + i, 1)]
          plgpu.copy_gmem_to_smem(kv_ref.at[pl.ds(r, 1)], dst, bar_full, oob_mode=oob)

      issue(0)

      @pl.loop(0, n_chunks)
      def _(j):
        plgpu.barrier_wait(bar_relaid)  # chunk j is in the operand buffer: the stage is free

        @pl.when(j + 1 < n_chunks)
        def _():
          issue(j + 1)

    @pl.when(wg < 2)
    def _compute_wg():
      if not interpret:
        plgpu.set_max_registers(bs.registers[0], action="increase")
      plgpu.barrier_wait(bar_in[0])
      if bs.idx_in_smem:
        plgpu.barrier_wait(bar_in[1])
      m_i = plgpu.layout_cast(
        jnp.full((HEAD_BLOCK,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
      )
      l_i = plgpu.layout_cast(
        jnp.full((HEAD_BLOCK,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
      )
      accs = tuple(
        plgpu.layout_cast(jnp.full((HEAD_BLOCK, 64), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        for _ in range(v_tiles)
      )
      v0 = wg * v_tiles  # this WG's first value-column tile
      half = bk // 2
      own = pl.ds(wg * half, half)

      def split_math(j, accs, m_i, l_i):
        def qk_scope(acc_ref):
          for c in range(n_tiles):
            plgpu.wgmma(acc_ref, q_smem.at[c], kv_smem.at[own, pl.ds(c * 64, 64)].T)
          return acc_ref[...]

        s = pl.run_scoped(qk_scope, plgpu.ACC((HEAD_BLOCK, half), jnp.float32))
        ids = plgpu.load(ids_ref.at[j, own], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
        s = _masked_logits(s, ids, qk_scale)
        xbuf.at[wg][...] = s.max(axis=1)
        plgpu.barrier_arrive(bar_x)
        plgpu.barrier_wait(bar_x)  # both halves' row maxima are in xbuf
        m_0 = plgpu.load(xbuf.at[0], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
        m_1 = plgpu.load(xbuf.at[1], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
        m_new = jnp.maximum(m_i, jnp.maximum(m_0, m_1))
        # l_i: this WG's slots only; the halves add up at the end.
        alpha, p, l_i = _softmax_update(s, m_i, m_new, l_i)
        pbufs.at[wg][...] = p.astype(dtype)
        plgpu.commit_smem()
        plgpu.barrier_arrive(bar_p)
        plgpu.barrier_wait(bar_p)  # the other WG's P half is in pbufs
        halves = [
          plgpu.load(pbufs.at[i], layout=plgpu.Layout.WGMMA, optimized=False) for i in (0, 1)
        ]
        p16 = jnp.concatenate(halves, axis=1)  # [64 heads, 64 slots], slot order of kv_smem
        return pv_update(accs, alpha, p16), m_new, l_i

      def pv_update(accs, alpha, p16, operand=kv_smem, bar=bar_free):
        new = pv(accs, p16, operand, alpha)
        plgpu.barrier_arrive(bar)
        return tuple(new)

      def math(j, carry, operand, bar):
        accs, m_i, l_i = carry

        def qk_scope(acc_ref):
          for c in range(n_tiles):
            plgpu.wgmma(acc_ref, q_smem.at[c], operand.at[:, pl.ds(c * 64, 64)].T)
          return acc_ref[...]

        s = pl.run_scoped(qk_scope, plgpu.ACC((HEAD_BLOCK, bk), jnp.float32))
        ids = plgpu.load(ids_ref.at[j], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
        m_new, alpha, p, l_i = _online_softmax(s, ids, m_i, l_i, qk_scale)
        return pv_update(accs, alpha, p.astype(dtype), operand, bar), m_new, l_i

      def wait_slot(slot, i):
        if interpret:
          plgpu.barrier_wait(bar_full.at[slot])
        else:
          lane_wait(raw_bars.at[pl.ds(slot * 2, 2)], i % 2)
          plgpu.commit_smem()  # the cp.async writes (generic proxy) before wgmma reads them

      def direct_step(j, carry):
        slot = j % 2
        wait_slot(slot, j // 2)
        if bs.probe_no_math:
          plgpu.barrier_arrive(bar_free.at[slot])
          return carry
        return math(j, carry, kv_smem.at[slot], bar_free.at[slot])

      def pv(accs, p, operand, alpha=None):
        """alpha * accs[c] + p @ v_tile(c) over this WG's value tiles of the [bk, Kp] operand
        (p: registers or an SMEM ref), each tile scaled right before its wgmma (fewer live
        registers)."""
        if interpret and isinstance(p, jax.Array):  # the interpreter reads A from SMEM only
          p_smem.at[wg][...] = p
          plgpu.commit_smem()
          p = p_smem.at[wg]
        new = []
        for c, acc in enumerate(accs):
          if alpha is not None:
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
          v_tile = operand.at[:, pl.ds((v0 + c) * 64, 64)]
          if interpret:

            def scope(acc_ref, a=p, b=v_tile):
              plgpu.wgmma(acc_ref, a, b)
              return acc_ref[...]

            new.append(acc + pl.run_scoped(scope, plgpu.ACC((HEAD_BLOCK, 64), jnp.float32)))
          else:
            new.append(_mma_acc(acc, p, v_tile, False))
        return new

      def pair_round(i, carry):
        # WG w owns slot w = chunk 2i + w. The WGs agree on the round's max before any exp2
        # (WG0 posts max(m_i, its row max) in xbuf row 0, WG1 folds in its own and posts the
        # result), so no P is rescaled afterwards (rescaling P spilled registers: ptxas caps
        # the kernel at 168 per thread whatever setmaxnreg says).
        accs, m_i, l_i = carry
        wait_slot(wg, i)

        def qk_scope(acc_ref):
          for c in range(n_tiles):
            plgpu.wgmma(acc_ref, q_smem.at[c], kv_smem.at[wg, :, pl.ds(c * 64, 64)].T)
          return acc_ref[...]

        s = pl.run_scoped(qk_scope, plgpu.ACC((HEAD_BLOCK, bk), jnp.float32))
        ids = plgpu.load(
          ids_ref.at[2 * i + wg], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False
        )
        s = _masked_logits(s, ids, qk_scale)
        m_w = jnp.maximum(m_i, s.max(axis=1))

        @pl.when(wg == 0)
        def _():
          xbuf.at[0][...] = m_w
          plgpu.barrier_arrive(bar_p.at[0])
          plgpu.barrier_wait(bar_p.at[1])

        @pl.when(wg == 1)
        def _():
          plgpu.barrier_wait(bar_p.at[0])
          posted = plgpu.load(xbuf.at[0], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
          xbuf.at[0][...] = jnp.maximum(m_w, posted)
          plgpu.barrier_arrive(bar_p.at[1])

        # Both read the agreed max back (WG0 rewrites row 0 only after WG1 posted its P tile).
        m_new = plgpu.load(xbuf.at[0], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
        alpha, p, l_i = _softmax_update(s, m_i, m_new, l_i)
        p = p.astype(dtype)
        kv_smem.at[wg, :, pl.ds(p_col, 64)][...] = p
        plgpu.commit_smem()
        plgpu.barrier_arrive(bar_x.at[wg])
        accs = pv(accs, p, kv_smem.at[wg], alpha)
        other = 1 - wg
        plgpu.barrier_wait(bar_x.at[other])  # the other WG's P tile is in its slot
        wait_slot(other, i)
        # Both P·Vs take A from registers: with A in SMEM (wgmma SS) ptxas spilled (H200).
        p = plgpu.load(kv_smem.at[other, :, pl.ds(p_col, 64)], layout=plgpu.Layout.WGMMA)
        accs = pv(accs, p, kv_smem.at[other])
        plgpu.barrier_arrive(bar_free.at[0])
        plgpu.barrier_arrive(bar_free.at[1])
        return tuple(accs), m_new, l_i

      def step(j, carry):
        accs, m_i, l_i = carry
        if bs.direct:
          return direct_step(j, carry)
        if bs.lane_copies:
          lane_wait(lane_bar, j % 2)
        else:
          plgpu.barrier_wait(bar_full)

        @pl.when(j > 0)
        def _():
          plgpu.barrier_wait(bar_free)  # both WGs are done with chunk j-1's operand

        pl.when(wg == 0)(lambda: relayout(stage, kv_smem, 0))
        pl.when(wg == 1)(lambda: relayout(stage, kv_smem, bk // 2))
        plgpu.commit_smem()
        plgpu.barrier_arrive(bar_relaid)
        plgpu.barrier_wait(bar_relaid)  # the other WG's half is in place too
        if bs.probe_no_math:
          plgpu.barrier_arrive(bar_free)
          return accs, m_i, l_i

        if bs.split_qk:
          return split_math(j, accs, m_i, l_i)
        return math(j, carry, kv_smem, bar_free)

      if bs.pairs:
        accs, m_i, l_i = lax.fori_loop(0, n_chunks // 2, pair_round, (accs, m_i, l_i))
      else:
        accs, m_i, l_i = lax.fori_loop(0, n_chunks, step, (accs, m_i, l_i))
      # Both WGs past their last logits: q_smem can take the output.
      if bs.direct and not bs.pairs:
        plgpu.barrier_arrive(bar_x)
        plgpu.barrier_wait(bar_x)
      elif not bs.direct:
        plgpu.barrier_wait(bar_free)
      if bs.pairs or bs.split_qk:  # the softmax denominator: the sum of the WGs' partial sums
        done = bar_end if bs.pairs else bar_x
        xbuf.at[wg][...] = l_i
        plgpu.barrier_arrive(done)
        plgpu.barrier_wait(done)
        l_0 = plgpu.load(xbuf.at[0], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
        l_i = l_0 + plgpu.load(xbuf.at[1], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
      has = l_i > 0
      l_safe = jnp.where(has, l_i, 1.0)
      inv = jnp.where(has, 1.0 / l_safe, 0.0)
      for c, acc in enumerate(accs):
        q_smem.at[v0 + c][...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
      plgpu.commit_smem()
      for c in range(v_tiles):
        cols = pl.ds((v0 + c) * 64, 64)
        plgpu.copy_smem_to_gmem(q_smem.at[v0 + c], o_ref.at[t, heads, cols])

      @pl.when(wg == 0)
      def _():
        lse_smem[...] = jnp.where(has, m_i * _LN2 + jnp.log(l_safe), jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[t, heads])

      plgpu.wait_smem_to_gmem(0)

  def entry(q_ref, kv_ref, idx_ref, o_ref, lse_ref):
    bufs = (
      _swizzled((n_tiles, HEAD_BLOCK, 64), dtype),  # q tile, then the output tile
      None if bs.direct else plgpu.SMEM((bk, kp_dim), dtype),  # untiled landing buffer
      _swizzled((2, bk, kp_dim) if bs.direct else (bk, kp_dim), dtype),  # wgmma operand(s)
      plgpu.SMEM((n_chunks, bk), jnp.int32) if bs.idx_in_smem else None,
      _swizzled((2, HEAD_BLOCK, bk), dtype) if interpret else None,
      plgpu.SMEM((2, HEAD_BLOCK, bk // 2), dtype) if bs.split_qk else None,  # P halves
      plgpu.SMEM((4, HEAD_BLOCK), jnp.float32),
    )
    bars = (
      plgpu.Barrier(num_arrivals=n_tiles),  # q tile (one arrival per column-tile copy)
      plgpu.Barrier(num_arrivals=1),  # idx row
      plgpu.Barrier(num_arrivals=bk, num_barriers=2 if bs.direct else 1),  # one per row copy
      plgpu.Barrier(num_arrivals=2),  # both compute WGs re-laid out their half (stage free)
      plgpu.Barrier(num_arrivals=2, num_barriers=2 if bs.direct else 1),  # operand done
      # split_qk: row maxima (and sums) exchanged; direct: loop end; pairs: WG w's P tile posted
      plgpu.Barrier(num_arrivals=1, num_barriers=2) if bs.pairs else plgpu.Barrier(num_arrivals=2),
      # split_qk: P halves exchanged; pairs: WG w's max posted
      plgpu.Barrier(num_arrivals=1, num_barriers=2) if bs.pairs else plgpu.Barrier(num_arrivals=2),
    )
    pl.run_scoped(
      lambda b, r: body(q_ref, kv_ref, idx_ref, o_ref, lse_ref, b, ((r[0], r[1]), *r[2:])),
      bufs,
      bars,
      collective_axes="wg",
    )

  out_type = (
    jax.ShapeDtypeStruct((n, hp, d_out), dtype),
    jax.ShapeDtypeStruct((n, hp), jnp.float32),
  )
  kern = plgpu.kernel(
    entry,
    out_type=out_type,
    grid=(hp // HEAD_BLOCK, n),  # heads fastest: a token's CTAs share its rows in L2
    grid_names=("h", "t"),
    num_threads=2 + bs.copy_wgs,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(
      approx_math=True,
      unsafe_no_auto_barriers=bs.no_auto_barriers,
      reduction_scratch_bytes=0,  # the row reductions stay inside a warp (WGMMA layout)
    ),
    interpret=interpret,
  )
  return kern(q, kv, idx3)
