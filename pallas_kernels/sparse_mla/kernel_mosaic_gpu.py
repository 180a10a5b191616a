# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Mosaic GPU (Hopper) sparse MLA forward over gathered top-k latent rows, warp-specialised.

Layout the wrapper (ops.py) hands to the kernel (batch folded into rows):
  q   [N, Hp, Kp]  N = B*T query tokens, heads padded to a multiple of 64, K padded to 64s
  kv  [R, Kp]      R = B*S latent rows
  idx [N, kp]      int32 global row numbers (b*S + s), -1 for an invalid slot, kp % 64 == 0

One CTA = one token x 64 heads (a token's head blocks launched as one cluster, `token_kernel`,
so they share its rows in L2),
3 warpgroups (WG): 2 compute WGs and 1 copy WG. Hopper has no TMA gather; the copy WG gathers
each 64-slot chunk of selected rows into one of two operand slots: each of its threads issues
16-byte `cp.async` pieces of the rows straight into the tiled + swizzled wgmma operand (it
computes the swizzled address itself, `_direct_ops`), so chunk j+1 lands while chunk j is
multiplied. The slot ids are staged per chunk in an SMEM ring of 4 (chunk j's 64 ids, one TMA,
in ring slot j % 4), two chunks ahead of the row copies, so the SMEM does not depend on k.
Chunks go to the compute WGs in pairs (even chunks to WG0, odd ones to WG1, FlashMLA's order):
each computes the logits of its own chunk (q·kᵀ over all Kp dims, N = 64) and its base-2 online
softmax, the running max is chained WG0 -> WG1 through SMEM, and each WG runs P·V of both chunks
of the pair for its half of the value columns (a 64 x (d_out / 2) f32 accumulator; its own P
from registers, the other's from SMEM). So one WG's softmax overlaps the other's wgmmas, a
token's rows are gathered once per 64 heads and their logits computed once per CTA. The q tile
is reused for the output once both compute WGs are past their last logits. See
`sparse_mla_fwd` for the steps and hand-offs, `smem_bytes` for the budget.
In the GPU interpreter (CPU tests) the same pipeline runs with Pallas row copies into the
swizzled slots (inline Mosaic GPU has no interpreter).
The copy ops and helpers here are shared with the backward (kernel_mosaic_gpu_bwd.py) and the
probabilities kernel (kernel_mosaic_gpu_probs.py).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
HEAD_BLOCK = 64  # wgmma M
BLOCK_K = 64  # selected rows per chunk (wgmma N of q·kᵀ, K of P·V)
WARPGROUPS = 3  # WG0, WG1 compute, WG2 copies
BWDS = ("xla", "kernel")
_SWIZZLE = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # wgmma operands
_SMEM_BYTES = 232448  # Hopper's opt-in maximum per CTA


def _round_up(x, m):
  return -(-x // m) * m


def kib(nbytes: int) -> int:
  """nbytes rounded up to whole KiB: what Mosaic GPU allocates for one SMEM buffer."""
  return _round_up(nbytes, 1024)


def padded_dims(k_dim: int, d_v: int, k: int) -> tuple[int, int, int]:
  """(Kp, d_out, kp): the kernel's row dim, output columns and slots for q/kv rows of k_dim,
  d_v value dims and k selected slots."""
  d_out = _round_up(d_v, 128)
  return _round_up(max(k_dim, d_out), 64), d_out, _round_up(k, BLOCK_K)


IDS_RING = 4  # SMEM slots of per-chunk slot ids (chunk j in slot j % 4)
_BARRIERS = 1 + IDS_RING + 4 + 1 + 2 + 2  # q, ids ring, m0/m1/P0/P1, P1 free, slots, end/l


def smem_bytes(kp_dim: int, itemsize: int) -> int:
  """SMEM the forward asks for on hardware (any k: the slot ids are staged per block): q + two
  operand slots (three 64-row tiles), the P1 tile [64, 64] (P0 goes over slot 0's first
  non-value tile; where Kp = d_out there is none and it takes one more 8 KiB tile, well within
  the budget), the ids ring [4, 64] int32, the f32 rows (m / l exchange, lse tile, raw
  mbarriers) [4, 64], each rounded up to whole KiB as Mosaic GPU does, and 8 bytes per Pallas
  barrier."""
  tiles = 3 * kib(HEAD_BLOCK * kp_dim * itemsize)
  p_tile = kib(HEAD_BLOCK * BLOCK_K * itemsize)
  return tiles + p_tile + kib(4 * IDS_RING * BLOCK_K) + kib(4 * 4 * HEAD_BLOCK) + 8 * _BARRIERS


def fits(kp_dim: int, itemsize: int = 2) -> bool:
  """Whether the forward's SMEM fits at row dim Kp (any k)."""
  return smem_bytes(kp_dim, itemsize) <= _SMEM_BYTES


@dataclasses.dataclass(frozen=True)
class GpuConfig:
  """The GPU sparse MLA kernels' settings (hashable: a static argument). The forward is one
  kernel (module docstring) with no settings of its own.

  bwd_block_t: the most query tokens per scan step of the backward (ops._bwd_blocked and
    ops._bwd_kernel_blocked), counted over the batch: a batch of b takes up to bwd_block_t // b
    tokens per step (fewer where a step's dK rows would reach 2**31 elements, the segment sum's
    int32 offsets), in steps evened out over the sequence (ops.balanced_step). At V3.2 a
    1024-token step holds 2.4 GB of bf16 dK rows and 1 GB of [dS; P] tiles.
  bwd: "kernel" (dq and the [dS; P] tiles from the Mosaic GPU kernel of
    kernel_mosaic_gpu_bwd.py, then the dK rows and their sorted sum in XLA,
    ops._bwd_kernel_blocked) or "xla" (the blocked XLA backward, ops._bwd_blocked: the fallback
    where the kernel's tiles do not fit in SMEM, `kernel_mosaic_gpu_bwd.fits`).
  """

  bwd_block_t: int = 1024
  bwd: str = "kernel"

  def __post_init__(self):
    if self.bwd_block_t < 1:
      raise ValueError(f"bwd_block_t={self.bwd_block_t} must be positive")
    if self.bwd not in BWDS:
      raise ValueError(f"bwd={self.bwd!r}; expected one of {BWDS}")

  @classmethod
  def default_for(cls, shape: tuple[int, int, int], device=None) -> "GpuConfig":
    """The config for shape = (k_dim, d_v, k) (q/kv row dim, value dims, selected slots) on
    `device` (default jax.devices()[0]; a GPU must be a Hopper, compute capability 9.x): the
    kernel backward, or "xla" where its tiles do not fit. (The forward raises where its own
    tiles do not fit, `fits`.)"""
    from pallas_kernels.sparse_mla import kernel_mosaic_gpu_bwd  # noqa: PLC0415 (imports this)

    device = device or jax.devices()[0]
    cc = getattr(device, "compute_capability", None)
    if device.platform == "gpu" and cc is not None and not str(cc).startswith("9"):
      raise ValueError(f"the Mosaic GPU sparse MLA kernels need a Hopper GPU (sm_90), got {cc}")
    kp_dim, d_out, _ = padded_dims(*shape)
    return cls(bwd="kernel" if kernel_mosaic_gpu_bwd.fits(kp_dim, d_out) else "xla")

  @property
  def registers(self) -> tuple[int, int]:
    """(compute, copy) registers per thread of the forward after setmaxnreg. The CTA keeps the
    registers it was launched with (64K / 384 threads, in steps of 8: 168 each), so
    2 * compute + copy must fit in that pool or the increase waits forever."""
    pool = 65536 // (128 * WARPGROUPS) // 8 * 8 * WARPGROUPS
    copy = 72
    return (pool - copy) // 2 // 8 * 8, copy


def _swizzled(shape, dtype):
  return plgpu.SMEM(shape, dtype, transforms=_SWIZZLE)


def _mma_acc(acc, a, b, interpret=False):
  """acc + a @ b with wgmma accumulating in place (a in registers or SMEM, b in SMEM). The
  interpreter cannot discharge an accumulating wgmma on a register value, so there a fresh
  product is added instead (same math)."""
  if interpret:

    def scope(acc_ref):
      plgpu.wgmma(acc_ref, a, b)
      return acc_ref[...]

    return acc + pl.run_scoped(scope, plgpu.ACC(acc.shape, jnp.float32))

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)

  return pl.run_state(body)(plgpu.ACC.init(acc))


def opaque_zero(interpret=False):
  """0 (int32) made by an instruction with side effects where it is called, so that LLVM cannot
  fold it or hoist what depends on it. Indexing the wgmma operands' SMEM refs with it inside a
  loop keeps their descriptors in the loop: otherwise LICM hoists every tile's descriptor pair
  (64-bit each, per 16-wide k step) out of it, and those loop invariants take the registers the
  accumulators need. The interpreter gets a plain 0."""
  if interpret:
    return 0
  from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415
  from jaxlib.mlir import ir  # noqa: PLC0415
  from jaxlib.mlir.dialects import llvm  # noqa: PLC0415

  @plgpu.inline_mgpu(
    return_type=plgpu.ShapeDtypeStruct((), jnp.int32, layout=plgpu.Layout.WG_SPLAT)
  )
  def zero(ctx):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    z = llvm.inline_asm(i32, [], "mov.u32 $0, 0;", "=r", has_side_effects=True)
    return mgpu.FragmentedArray.splat(z, (), is_signed=True)

  return zero()


def _scalar(x):
  """The one register of a WG_SPLAT argument of inline_mgpu."""
  from jaxlib.mlir import ir  # noqa: PLC0415
  from jaxlib.mlir.dialects import vector  # noqa: PLC0415

  if not isinstance(x, ir.Value):  # a splat FragmentedArray
    x = x.registers.flat[0]
  if isinstance(x.type, ir.VectorType):
    x = vector.extract(x, [], [0])
  return x


def _direct_ops(n_rows: int, row_bytes: int):
  """Inline Mosaic GPU (init, issue, wait) on raw SMEM mbarriers (Pallas barriers cannot be
  passed to inline_mgpu) for the direct row copies of the forward, the backward and the
  probabilities kernel: the rows land straight in the tiled + swizzled wgmma operand.

  The operand [2, n_rows, row_bytes / 2] bf16 is stored as 1 KiB tiles of 8 rows x 128 bytes
  (row tile major, then column tile), and the 128-byte swizzle XORs a 16-byte piece's index
  with the row's index inside its tile (PTX ISA, wgmma shared memory layouts). Thread i of the
  copy WG, in group g = i / 8 of 8 threads, copies piece i % 8 of every 128-byte line of rows
  g, g + 16, ...: those rows share g % 8, so the swizzled destination is one per-thread base
  plus compile-time offsets, and a group writes whole 128-byte lines. The slot ids are read
  once per chunk. The copies ask L2 for 128-byte lines (`.L2::128B`), not 256: a 576-dim bf16
  row is 1152 bytes, 4.5 spans of 256, so a 256-byte fetch pulls half a line of a neighbouring
  row from HBM for every row (11% more traffic where the rows are not in L2, as at 128K keys).
  Each thread then makes the slot's raw mbarrier track its copies
  (`cp.async.mbarrier.arrive.noinc`): a phase completes when all 128 threads' pieces landed.
  init: one thread sets up the two slots' mbarriers (128 arrivals per phase each).
  wait: waits for the phase of the given parity on one mbarrier.
  """
  from jax.experimental.mosaic.gpu import utils as mu  # noqa: PLC0415
  from jaxlib.mlir import ir  # noqa: PLC0415
  from jaxlib.mlir.dialects import arith, gpu, llvm, memref, nvvm  # noqa: PLC0415

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
    last_row = c(ir.MemRefType(kv.type).shape[0] - 1)
    rows = []
    for k in range(n_rows // 16):
      pos = arith.addi(g, c(16 * k))
      rid = memref.load(ids, [arith.index_cast(index, pos)])
      invalid = arith.cmpi(arith.CmpIPredicate.slt, rid, c(0))
      rid = arith.select(invalid, arith.minsi(pos, last_row), rid)  # see stand_in_row
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
          "cp.async.cg.shared.global.L2::128B [$0], [$1], 16;",
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

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.Layout.WG_SPLAT))
  def wait(ctx, bar, parity):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    nvvm.mbarrier_try_wait_parity(mu.memref_ptr(bar), _scalar(parity), mu.c(10000000, i32))

  return init, issue, wait


# (ranges per warpgroup, directory) or None. When set, the kernels built by `token_kernel`
# (forward, backward, probabilities) record their named regions (jax.named_scope) per warpgroup
# with the Mosaic GPU profiler and write one Chrome-trace JSON per call into the directory. Each
# range takes 16 bytes of SMEM per warpgroup next to the kernel's own (which at V3.2's Kp 576
# leaves none: profile at Kp 512). For experiments/profile_sparse_mla_kernels.py.
PROFILE: tuple[int, str] | None = None


CLUSTER_SIZES = (2, 4, 8)  # head blocks a token may have to launch them as one cluster


def token_kernel(entry, out_type, hp: int, n: int, num_threads: int, interpret):
  """plgpu.kernel over the (head block "h", token "t") CTAs of the sparse MLA kernels; one
  thread per warpgroup ("wg"); the row reductions stay inside a warp (WGMMA layout), so no
  reduction scratch. Where a token has 2, 4 or 8 head blocks (V3.2's 128 heads: 2), they are
  launched as one cluster over "h": the hardware starts a cluster's CTAs together on one GPC,
  so the second CTA to read a selected row tends to find it in L2 rather than fetch it again
  (nothing else in the kernels depends on the cluster). A plain grid, heads fastest, otherwise
  and in the interpreter. PROFILE (above) adds the Mosaic GPU profiler (not in the
  interpreter)."""
  prof = {}
  if PROFILE is not None and not interpret:
    prof = dict(profile_space=PROFILE[0], profile_dir=PROFILE[1])
  nh = hp // HEAD_BLOCK
  grid = dict(grid=(nh, n), grid_names=("h", "t"))
  if nh in CLUSTER_SIZES and not interpret:
    grid = dict(grid=(n,), grid_names=("t",), cluster=(nh,), cluster_names=("h",))
  return plgpu.kernel(
    entry,
    out_type=out_type,
    **grid,
    num_threads=num_threads,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0, **prof),
    interpret=interpret,
  )


def stand_in_row(row_id, pos: int, n_rows: int):
  """The kv row slot `pos` of a chunk fetches: its id, or for an invalid id (< 0) row
  min(pos, n_rows - 1). That row is finite and the readers mask the slot; spreading the stand-ins
  over a chunk's positions, instead of sending every one to row 0, keeps causal prefixes (up to
  k - 1 invalid slots a query) from hammering one L2 line (docs/architecture.md, Kernels)."""
  return jnp.where(row_id < 0, min(pos, n_rows - 1), row_id)


def issue_chunk(kv_ref, kv_smem, ids_row, slot, bar_full, raw_bars, issue_op):
  """The rows of one chunk (ids_row: its [bk] slot ids in SMEM) into operand slot `slot` of
  kv_smem. issue_op: `_direct_ops`' issue; None in the interpreter, which has no inline Mosaic
  GPU: one Pallas row copy per row, arriving on bar_full[slot]."""
  if issue_op is not None:
    issue_op(kv_ref, kv_smem, ids_row, raw_bars, slot)
    return
  for i in range(ids_row.shape[0]):
    row = stand_in_row(ids_row[i], i, kv_ref.shape[0])
    dst = kv_smem.at[slot, pl.ds(i, 1)]
    plgpu.copy_gmem_to_smem(kv_ref.at[pl.ds(row, 1)], dst, bar_full.at[slot])


def copy_chunks_direct(kv_ref, kv_smem, ids, n_live, bar_free, bar_full, raw_bars, issue_op):
  """The copy warpgroup's loop of copy_wg_direct: chunk j < n_live's rows (ids [n_chunks, bk] in
  SMEM; n_live traced, >= 1) into operand slot j % 2 of kv_smem (issue_chunk), once the slot's
  chunk j - 2 is released on bar_free[slot]."""

  def issue(j):
    issue_chunk(kv_ref, kv_smem, ids.at[j], j % 2, bar_full, raw_bars, issue_op)

  issue(0)
  if ids.shape[0] > 1:
    pl.when(n_live > 1)(lambda: issue(1))

  @pl.loop(2, n_live)
  def _(j):
    plgpu.barrier_wait(bar_free.at[j % 2])  # chunk j - 2 is done with the slot
    issue(j)


def single_pass_barriers(n_tiles: int, bk: int, interpret):
  """The barriers of the single-pass probabilities kernel (kernel_mosaic_gpu_probs.py), in the
  order its body unpacks them: q's n_tiles tiles landed (WG0's copies), the token's ids landed, a
  slot's rows landed (the interpreter's row copies; direct copies use raw mbarriers), a slot's
  rows read (what copy_wg_direct waits for)."""
  return (
    plgpu.Barrier(num_arrivals=n_tiles),
    plgpu.Barrier(num_arrivals=1),
    plgpu.Barrier(num_arrivals=bk, num_barriers=2) if interpret else None,
    plgpu.Barrier(num_arrivals=1, num_barriers=2),
  )


def copy_wg_direct(kv_ref, kv_smem, ids, n_live, bar_ids, bar_free, bar_full, raw_bars, issue_op):
  """A whole copy warpgroup of the single-pass probabilities kernel (kernel_mosaic_gpu_probs.py):
  once the token's ids (ids [n_chunks, bk] in SMEM) arrived on bar_ids, copy_chunks_direct over
  its first n_live chunks, then observe each used slot's last release (the interpreter checks),
  so the kernel ends after the reads."""
  plgpu.barrier_wait(bar_ids)
  copy_chunks_direct(kv_ref, kv_smem, ids, n_live, bar_free, bar_full, raw_bars, issue_op)
  plgpu.barrier_wait(bar_free.at[0])
  if ids.shape[0] > 1:
    pl.when(n_live > 1)(lambda: plgpu.barrier_wait(bar_free.at[1]))


def chunk_logits_t(rows, q_tiles, wait, w: int, i, bar_full, raw_bars, interpret):
  """For a compute warpgroup w of the single-pass probabilities kernel (it takes every second
  chunk): wait for its i-th chunk's rows (operand slot `rows`, filled by copy_wg_direct) and
  return the transposed logits R·qᵀ [slots, 64 heads] f32 (q_tiles [Kp/64, 64, 64]: q's column
  tiles), so that per-slot sums over heads stay inside a warp. wait: `_direct_ops`' wait (None in
  the interpreter)."""
  if interpret:
    plgpu.barrier_wait(bar_full.at[w])
  else:
    wait(raw_bars.at[pl.ds(w * 2, 2)], i % 2)
    plgpu.commit_smem()  # the cp.async writes (generic proxy) before wgmma reads them

  def scope(acc_ref):
    for c in range(q_tiles.shape[0]):
      plgpu.wgmma(acc_ref, rows.at[:, pl.ds(c * 64, 64)], q_tiles.at[c].T)
    return acc_ref[...]

  return pl.run_scoped(scope, plgpu.ACC((rows.shape[0], HEAD_BLOCK), jnp.float32))


def sparse_mla_fwd(q, kv, idx, *, scale: float, d_out: int, config: GpuConfig, interpret=False):
  """q [N,Hp,Kp], kv [R,Kp], idx [N,kp] -> out [N,Hp,d_out] (value dims first), lse [N,Hp].

  Needs Hp % 64 == 0, Kp % 64 == 0, kp % 64 == 0, d_out % 128 == 0, d_out <= min(Kp, 512) and
  `fits(Kp)`. The SMEM q tile is stored as [Kp/64, 64, 64] column tiles (each contiguous: the
  output reuses it, and TMA stores need contiguous SMEM).

  64-slot blocks go in pairs: block 2p to WG0 in operand slot 0, block 2p + 1 to WG1 in slot 1
  (an odd block count gets one all-invalid block). A token runs only the pairs up to its last
  valid slot (`_common.live_chunks`, read per CTA from an [N] input): later blocks add
  nothing. Each compute WG owns half the value columns (a 64 x d_out/2 f32 accumulator) and
  computes the logits of its own block only (wgmma N = 64, so q is read from SMEM once per 64
  slots). The running max m is chained through SMEM. Per pair:
    WG0: S0 = q·K0ᵀ, m0 = max(m, rowmax S0) -> SMEM (bar_m0); P0 = exp2(S0 - m0), stored (bf16)
         over slot 0's first non-value tile, dead once S0 is done (bar_p0; a tile of its own
         when Kp = d_out); P0·V from registers over its value half (then it releases slot
         0); after m1 (bar_m1) it rescales by exp2(m0 - m1) and, once P1 is stored (bar_p1),
         runs P1·V from SMEM, then releases slot 1 and the P1 tile (bar_p1free).
    WG1: S1 = q·K1ᵀ, then after m0: m1 = max(m0, rowmax S1) -> SMEM (bar_m1); P0·V from SMEM
         (after rescaling to m0) and the release of slot 0 come before its own softmax, so
         slot 0 is refilled while that softmax and the rest of the pair run; P1 = exp2(S1 -
         m1) into the P1 tile (once WG0 read the last one); P1·V from registers (after
         rescaling to m1), then it releases slot 1.
    WG2 (copies): refills an operand slot and its ids ring slot once both compute WGs released
         the block there (bar_free), two blocks behind.
  So one WG's softmax runs while the other's wgmmas keep the tensor cores busy. Each compute
  WG keeps its own l (relative to its running max, which equals the other's at the end of a
  pair); l0 + l1 is summed through SMEM after the loop.
  Registers (setmaxnreg, `GpuConfig.registers`): the compute WGs hold a 64 x 256 accumulator,
  the 64 x 64 logits and P, so they take 216 a thread and the copy WG gives back to 72.
  The slot ids are staged per block in an SMEM ring of 4 (block j's 64 ids, one TMA, in ring
  slot j % 4): WG0 fetches blocks 0..3, the copy WG block j + 2 when block j - 2 is released.
  SMEM at V3.2 (Kp 576, bf16): q 72 KiB + operand slots 144 + the P1 tile 8 + ids ring 1 + f32
  rows 1 + 14 barriers (`smem_bytes`) of 227 KiB.
  The interpreter (no inline Mosaic GPU, A operands from SMEM only) copies rows with Pallas
  copies on bar_full and runs the own P·V from the stored P tiles.
  """
  n, hp, kp_dim = q.shape
  bk = BLOCK_K
  if hp % HEAD_BLOCK or kp_dim % 64 or idx.shape[1] % bk or d_out % 128 or d_out > kp_dim:
    raise ValueError(f"bad kernel layout: q {q.shape}, idx {idx.shape}, d_out={d_out}")
  if d_out > 512:  # each WG's P·V is one wgmma over d_out / 2 columns (wgmma N <= 256)
    raise ValueError(f"d_out={d_out}: the forward takes at most 512 value columns")
  if not fits(kp_dim, q.dtype.itemsize):
    need = smem_bytes(kp_dim, q.dtype.itemsize)
    raise ValueError(f"the forward needs {need} of {_SMEM_BYTES} bytes of SMEM at Kp={kp_dim}")
  # Blocks go in pairs (block 2p to WG0 in operand slot 0, 2p + 1 to WG1 in slot 1): an odd
  # block count gets one all-invalid block.
  if (idx.shape[1] // bk) % 2:
    idx = jnp.pad(idx, ((0, 0), (0, bk)), constant_values=-1)
  kp = idx.shape[1]
  n_chunks = kp // bk
  idx3 = idx.reshape(n, n_chunks, bk)
  live = _common.live_chunks(idx, bk, 2)  # per token, pairs of blocks up to its last valid slot
  n_tiles = kp_dim // 64
  v_tiles = d_out // 64
  per = [v_tiles // 2, v_tiles - v_tiles // 2]  # value-column tiles of WG0, WG1
  starts = [0, per[0]]
  p0_in_slot = kp_dim >= d_out + 64  # WG0's P over block 2p's first non-value tile
  dtype = q.dtype
  qk_scale = scale * _LOG2E
  oob = plgpu.OOBFillMode.PROMISE_IN_BOUNDS
  f32 = jnp.float32
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  if not interpret:
    direct_init, direct_issue, mbarrier_wait = _direct_ops(bk, kp_dim * q.dtype.itemsize)

  def rescale(acc, f):
    return acc * lax.broadcast_in_dim(f, acc.shape, [0])

  def body(q_ref, kv_ref, idx_ref, live_ref, o_ref, lse_ref, bufs, bars):
    q_smem, kv_smem, p1_smem, p0_own, ids_ring, misc = bufs
    (
      bar_q,
      bar_ids,
      bar_full,
      bar_m0,
      bar_m1,
      bar_p0,
      bar_p1,
      bar_p1free,
      bar_free,
      bar_end,
      bar_l,
    ) = bars
    # misc (f32): row 0 m0, row 1 m1 (per pair), row 2 the lse tile, row 3 [:4] the raw
    # mbarriers; after the loop rows 0, 1 take l0, l1.
    lse_smem, raw_bars = misc.at[2], misc.at[3, pl.ds(0, 4)]

    def p0_ref(step):
      """Where WG0 stores its P: block 2p's first non-value tile (slot 0) when there is one."""
      if not p0_in_slot:
        return p0_own
      return kv_smem.at[step * 0].at[:, pl.ds(d_out, 64)]  # traced slot: see pv

    t = lax.axis_index("t")
    hb = lax.axis_index("h")
    wg = lax.axis_index("wg")
    heads = pl.ds(hb * HEAD_BLOCK, HEAD_BLOCK)
    n_live = live_ref[t]  # blocks this token runs (even, >= 2): later ones are all invalid

    def fetch_ids(j):
      r = j % IDS_RING
      plgpu.copy_gmem_to_smem(idx_ref.at[t, j], ids_ring.at[r], bar_ids.at[r], oob_mode=oob)

    def cols(w):
      return pl.ds(starts[w] * 64, per[w] * 64)

    def zeros(w):
      return plgpu.layout_cast(jnp.zeros((HEAD_BLOCK, per[w] * 64), f32), plgpu.Layout.WGMMA)

    def pv(acc, p, slot, w):
      # The slot as a traced value: a constant leading index trips the accumulating wgmma's
      # lowering ("Shaped arrays must be represented by ir.Values"); an opaque one also keeps
      # the operand's descriptors in the loop (see opaque_zero).
      z = opaque_zero(interpret)
      return _mma_acc(acc, p, kv_smem.at[z + slot].at[:, cols(w)], interpret)

    @pl.when(wg == 0)
    def _():
      if not interpret:  # before the ids copies: their barriers order the init
        direct_init(raw_bars)
      for j in range(2):
        fetch_ids(j)
      for c in range(n_tiles):
        plgpu.copy_gmem_to_smem(q_ref.at[t, heads, pl.ds(c * 64, 64)], q_smem.at[c], bar_q)
      for j in range(2, min(IDS_RING, n_chunks)):  # only blocks that run: every copy is waited

        @pl.when(j < n_live)
        def _(j=j):
          fetch_ids(j)

    def issue(j):
      r = j % IDS_RING
      plgpu.barrier_wait(bar_ids.at[r])
      issue_op = None if interpret else direct_issue
      issue_chunk(kv_ref, kv_smem, ids_ring.at[r], j % 2, bar_full, raw_bars, issue_op)

    def wait_rows(slot, p):
      if interpret:
        plgpu.barrier_wait(bar_full.at[slot])
      else:
        mbarrier_wait(raw_bars.at[pl.ds(slot * 2, 2)], p % 2)
        plgpu.commit_smem()  # the cp.async writes (generic proxy) before wgmma reads them

    def logits(slot, j):
      """Scaled, masked logits of block j (in operand slot `slot`) for this WG's 64 heads."""
      z = opaque_zero(interpret)
      operand = kv_smem.at[z + slot]

      def scope(acc_ref):
        for c in range(n_tiles):
          plgpu.wgmma(acc_ref, q_smem.at[z + c], operand.at[:, pl.ds(c * 64, 64)].T)
        return acc_ref[...]

      s = pl.run_scoped(scope, plgpu.ACC((HEAD_BLOCK, bk), f32))
      ids = plgpu.load(
        ids_ring.at[j % IDS_RING], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False
      )
      return jnp.where(lax.broadcast_in_dim(ids >= 0, s.shape, [1]), s * qk_scale, -jnp.inf)

    def finite(m):
      return jnp.where(m == -jnp.inf, 0.0, m)  # all-invalid so far: keep exp2 finite

    def store_p(p_ref, p):
      p_ref[...] = p.astype(dtype)
      plgpu.commit_smem()

    def finish(acc, m, l, w):
      """Both compute WGs past the loop (their last reads of q_smem and the m rows): l0 + l1
      through SMEM, then each WG's output columns through q_smem's tiles; WG0 writes the lse."""
      plgpu.barrier_arrive(bar_end)
      plgpu.barrier_wait(bar_end)
      misc.at[w][...] = l
      plgpu.barrier_arrive(bar_l)
      plgpu.barrier_wait(bar_l)
      l = plgpu.load(misc.at[0], layout=row_layout, optimized=False) + plgpu.load(
        misc.at[1], layout=row_layout, optimized=False
      )
      has = l > 0
      l_safe = jnp.where(has, l, 1.0)
      inv = jnp.where(has, 1.0 / l_safe, 0.0)
      out = rescale(acc, inv).astype(dtype)
      for i in range(per[w]):
        q_smem.at[starts[w] + i][...] = out[:, i * 64 : (i + 1) * 64]
      plgpu.commit_smem()
      for i in range(per[w]):
        c = starts[w] + i
        plgpu.copy_smem_to_gmem(q_smem.at[c], o_ref.at[t, heads, pl.ds(c * 64, 64)])
      if w == 0:
        lse_smem[...] = jnp.where(has, m * _LN2 + jnp.log(l_safe), jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[t, heads])
      plgpu.wait_smem_to_gmem(0)

    m_init = plgpu.layout_cast(jnp.full((HEAD_BLOCK,), -jnp.inf, f32), row_layout)
    l_init = plgpu.layout_cast(jnp.full((HEAD_BLOCK,), 0.0, f32), row_layout)

    def enter():
      """A compute WG's start: its registers, then q in SMEM."""
      if not interpret:
        plgpu.set_max_registers(config.registers[0], action="increase")
      plgpu.barrier_wait(bar_q)

    def own_logits(w, p):
      """The logits of compute WG w's block of pair p (block 2p + w, in operand slot w)."""
      j = 2 * p + w
      with jax.named_scope("rows_wait"):
        plgpu.barrier_wait(bar_ids.at[j % IDS_RING])
        wait_rows(w, p)
      with jax.named_scope("qk"):
        return logits(w, j)

    @pl.when(wg == 0)
    def _wg0():
      enter()

      def step(p, carry):
        acc, m_prev, l = carry
        s = own_logits(0, p)
        m0 = jnp.maximum(m_prev, s.max(axis=1))
        misc.at[0][...] = m0
        plgpu.barrier_arrive(bar_m0)
        alpha = jnp.exp2(m_prev - finite(m0))
        pr = jnp.exp2(s - lax.broadcast_in_dim(finite(m0), s.shape, [0]))
        l = l * alpha + pr.sum(axis=1)
        store_p(p0_ref(p), pr)  # over block 2p's rope tile: its last reader was the logits above
        plgpu.barrier_arrive(bar_p0)
        with jax.named_scope("pv_own"):
          acc = pv(rescale(acc, alpha), p0_ref(p) if interpret else pr.astype(dtype), 0, 0)
        plgpu.barrier_arrive(bar_free.at[0])
        with jax.named_scope("m1_wait"):
          plgpu.barrier_wait(bar_m1)
        m1 = plgpu.load(misc.at[1], layout=row_layout, optimized=False)
        f = jnp.exp2(finite(m0) - finite(m1))
        acc, l = rescale(acc, f), l * f
        with jax.named_scope("p1_wait"):
          plgpu.barrier_wait(bar_p1)
        with jax.named_scope("pv_other"):
          acc = pv(acc, p1_smem, 1, 0)
        plgpu.barrier_arrive(bar_free.at[1])
        plgpu.barrier_arrive(bar_p1free)
        return acc, m1, l

      acc, m, l = lax.fori_loop(0, n_live // 2, step, (zeros(0), m_init, l_init))
      finish(acc, m, l, 0)

    @pl.when(wg == 1)
    def _wg1():
      enter()

      def step(p, carry):
        acc, m_prev, l = carry
        s = own_logits(1, p)
        with jax.named_scope("m0_wait"):
          plgpu.barrier_wait(bar_m0)
        m0 = plgpu.load(misc.at[0], layout=row_layout, optimized=False)
        m1 = jnp.maximum(m0, s.max(axis=1))
        misc.at[1][...] = m1
        plgpu.barrier_arrive(bar_m1)

        # Block 2p's P·V before this WG's own softmax, so slot 0 is released (and refilled)
        # while the softmax and the own P·V run.
        with jax.named_scope("p0_wait"):
          plgpu.barrier_wait(bar_p0)
        with jax.named_scope("pv_other"):
          acc = pv(rescale(acc, jnp.exp2(m_prev - finite(m0))), p0_ref(p), 0, 1)
        plgpu.barrier_arrive(bar_free.at[0])
        pr = jnp.exp2(s - lax.broadcast_in_dim(finite(m1), s.shape, [0]))
        l = l * jnp.exp2(m_prev - finite(m1)) + pr.sum(axis=1)
        with jax.named_scope("p1_free_wait"):

          @pl.when(p > 0)
          def _():
            plgpu.barrier_wait(bar_p1free)

        store_p(p1_smem, pr)
        plgpu.barrier_arrive(bar_p1)
        own = p1_smem if interpret else pr.astype(dtype)
        with jax.named_scope("pv_own"):
          acc = pv(rescale(acc, jnp.exp2(finite(m0) - finite(m1))), own, 1, 1)
        plgpu.barrier_arrive(bar_free.at[1])
        return acc, m1, l

      acc, m, l = lax.fori_loop(0, n_live // 2, step, (zeros(1), m_init, l_init))
      plgpu.barrier_wait(bar_p1free)  # observe the last phase
      finish(acc, m, l, 1)

    @pl.when(wg == 2)
    def _wg2():
      if not interpret:
        plgpu.set_max_registers(config.registers[1], action="decrease")
      issue(0)
      issue(1)

      @pl.loop(2, n_live)
      def _(j):
        # Block j - 2 is released by both compute WGs: its operand slot (with P0 over slot 0)
        # and its ids ring slot are free.
        with jax.named_scope("slot_wait"):
          plgpu.barrier_wait(bar_free.at[j % 2])

        @pl.when(j + 2 < n_live)
        def _():
          fetch_ids(j + 2)

        with jax.named_scope("issue"):
          issue(j)

      for slot in range(2):  # observe the last releases too (n_live is even)
        plgpu.barrier_wait(bar_free.at[slot])

  def sparse_mla_fwd_kernel(q_ref, kv_ref, idx_ref, live_ref, o_ref, lse_ref):  # profile name
    bufs = (
      _swizzled((n_tiles, HEAD_BLOCK, 64), dtype),  # q tile, then the output tile
      _swizzled((2, bk, kp_dim), dtype),  # two wgmma operand slots
      _swizzled((HEAD_BLOCK, bk), dtype),  # P1 (WG1's P)
      None if p0_in_slot else _swizzled((HEAD_BLOCK, bk), dtype),  # P0 without a free tile
      plgpu.SMEM((IDS_RING, bk), jnp.int32),  # the ids ring
      plgpu.SMEM((4, HEAD_BLOCK), f32),  # m0, m1 (then l0, l1), lse tile, raw mbarriers
    )
    one = dict(num_arrivals=1)
    bars = (
      plgpu.Barrier(num_arrivals=n_tiles),  # q tile (one arrival per column-tile copy)
      plgpu.Barrier(num_arrivals=1, num_barriers=IDS_RING),  # a chunk's ids landed
      plgpu.Barrier(num_arrivals=bk, num_barriers=2) if interpret else None,  # rows (interp.)
      plgpu.Barrier(**one),  # m0 written (WG0)
      plgpu.Barrier(**one),  # m1 written (WG1)
      plgpu.Barrier(**one),  # P0 stored (WG0)
      plgpu.Barrier(**one),  # P1 stored (WG1)
      plgpu.Barrier(**one),  # P1 read by WG0
      plgpu.Barrier(num_arrivals=2, num_barriers=2),  # operand slot released by WG0 and WG1
      plgpu.Barrier(num_arrivals=2),  # both compute WGs past the loop
      plgpu.Barrier(num_arrivals=2),  # l0, l1 written
    )
    pl.run_scoped(
      lambda b, r: body(q_ref, kv_ref, idx_ref, live_ref, o_ref, lse_ref, b, r),
      bufs,
      bars,
      collective_axes="wg",
    )

  out_type = (
    jax.ShapeDtypeStruct((n, hp, d_out), dtype),
    jax.ShapeDtypeStruct((n, hp), f32),
  )
  kern = token_kernel(sparse_mla_fwd_kernel, out_type, hp, n, WARPGROUPS, interpret)
  return kern(q, kv, idx3, live)
