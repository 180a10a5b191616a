# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Mosaic GPU (Hopper) sparse MLA forward over gathered top-k latent rows, warp-specialised.

Layout the wrapper (ops.py) hands to the kernel (batch folded into rows):
  q   [N, Hp, Kp]  N = B*T query tokens, heads padded to a multiple of 64, K padded to 64s
  kv  [R, Kp]      R = B*S latent rows
  idx [N, kp]      int32 global row numbers (b*S + s), -1 for an invalid slot, kp % 64 == 0

One CTA = one token x 64 heads (grid: heads fastest, so a token's CTAs share its rows in L2),
3 warpgroups (WG): 2 compute WGs and 1 copy WG. Hopper has no TMA gather; the copy WG gathers
each 64-slot chunk of selected rows into one of two operand slots: each of its threads issues
16-byte `cp.async` pieces of the rows straight into the tiled + swizzled wgmma operand (it
computes the swizzled address itself, `_direct_ops`), so chunk j+1 lands while chunk j is
multiplied. The slot ids are staged per chunk in an SMEM ring of 4 (chunk j's 64 ids, one TMA,
in ring slot j % 4), two chunks ahead of the row copies, so the SMEM does not depend on k.
Per chunk each compute WG computes the logits of its 32 slots (q·kᵀ over all Kp dims), the two
exchange their row maxima and bf16 P halves through SMEM (two WG barriers per chunk), and each
runs the base-2 online softmax and P·V over the whole chunk for its half of the value columns
(a 64 x (d_out / 2) f32 accumulator). So a token's rows are gathered once per 64 heads and their
logits computed once per CTA. The q tile is reused for the output once both compute WGs are past
their last logits. See `sparse_mla_fwd` for the steps and hazards, `smem_bytes` for the budget.
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
_BARRIERS = 1 + IDS_RING + 2 + 1 + 1 + 1  # q, ids ring, operand free, max, P, end


def smem_bytes(kp_dim: int, itemsize: int) -> int:
  """SMEM the forward asks for on hardware (any k: the slot ids are staged per chunk): q + two
  operand slots (three 64-row tiles), the two P halves [2, 64, 32], the ids ring [4, 64] int32,
  the f32 rows (max / l exchange, lse tile, raw mbarriers) [4, 64], each rounded up to whole KiB
  as Mosaic GPU does, and 8 bytes per Pallas barrier."""
  tiles = 3 * kib(HEAD_BLOCK * kp_dim * itemsize)
  p_halves = kib(2 * HEAD_BLOCK * (BLOCK_K // 2) * itemsize)
  return tiles + p_halves + kib(4 * IDS_RING * BLOCK_K) + kib(4 * 4 * HEAD_BLOCK) + 8 * _BARRIERS


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
  once per chunk. `.L2::256B` asks L2 for the whole 256-byte span a group's next lines need.
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


def token_kernel(entry, out_type, hp: int, n: int, num_threads: int, interpret):
  """plgpu.kernel over the (head block, token) grid of the sparse MLA kernels: heads fastest,
  so a token's CTAs share its rows in L2; one thread per warpgroup ("wg"); the row
  reductions stay inside a warp (WGMMA layout), so no reduction scratch. PROFILE (above) adds
  the Mosaic GPU profiler (not in the interpreter)."""
  prof = {}
  if PROFILE is not None and not interpret:
    prof = dict(profile_space=PROFILE[0], profile_dir=PROFILE[1])
  return plgpu.kernel(
    entry,
    out_type=out_type,
    grid=(hp // HEAD_BLOCK, n),
    grid_names=("h", "t"),
    num_threads=num_threads,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0, **prof),
    interpret=interpret,
  )


def issue_chunk(kv_ref, kv_smem, ids_row, slot, bar_full, raw_bars, issue_op):
  """The rows of one chunk (ids_row: its [bk] slot ids in SMEM) into operand slot `slot` of
  kv_smem. issue_op: `_direct_ops`' issue; None in the interpreter, which has no inline Mosaic
  GPU: one Pallas row copy per row, arriving on bar_full[slot]."""
  if issue_op is not None:
    issue_op(kv_ref, kv_smem, ids_row, raw_bars, slot)
    return
  for i in range(ids_row.shape[0]):
    row = jnp.maximum(ids_row[i], 0)  # invalid slots fetch row 0 (masked by the readers)
    dst = kv_smem.at[slot, pl.ds(i, 1)]
    plgpu.copy_gmem_to_smem(kv_ref.at[pl.ds(row, 1)], dst, bar_full.at[slot])


def copy_chunks_direct(kv_ref, kv_smem, ids, n_chunks, bar_free, bar_full, raw_bars, issue_op):
  """The copy warpgroup's loop of copy_wg_direct: chunk j's rows (ids [n_chunks, bk] in SMEM)
  into operand slot j % 2 of kv_smem (issue_chunk), once the slot's chunk j - 2 is released on
  bar_free[slot]."""

  def issue(j):
    issue_chunk(kv_ref, kv_smem, ids.at[j], j % 2, bar_full, raw_bars, issue_op)

  issue(0)
  if n_chunks > 1:
    issue(1)

  @pl.loop(2, n_chunks)
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


def copy_wg_direct(kv_ref, kv_smem, ids, bar_ids, bar_free, bar_full, raw_bars, issue_op):
  """A whole copy warpgroup of the single-pass probabilities kernel (kernel_mosaic_gpu_probs.py):
  once the token's ids (ids [n_chunks, bk] in SMEM) arrived on bar_ids, copy_chunks_direct, then
  observe each slot's last release (the interpreter checks), so the kernel ends after the reads."""
  plgpu.barrier_wait(bar_ids)
  n_chunks = ids.shape[0]
  copy_chunks_direct(kv_ref, kv_smem, ids, n_chunks, bar_free, bar_full, raw_bars, issue_op)
  for slot in range(min(2, n_chunks)):
    plgpu.barrier_wait(bar_free.at[slot])


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

  Needs Hp % 64 == 0, Kp % 64 == 0, kp % 64 == 0, d_out % 128 == 0, d_out <= Kp and `fits(Kp)`.
  The SMEM q tile is stored as [Kp/64, 64, 64] column tiles (each contiguous: the output reuses
  it, and TMA stores need contiguous SMEM).

  Per 64-slot chunk j (operand slot j % 2, rows R [64, Kp]), compute warpgroup w in {0, 1}:
    1. waits for the rows, S_w = q·R[32w : 32w + 32]ᵀ [64 heads, 32 slots] (wgmma N = 32), so the
       logits are computed once per CTA;
    2. masks its invalid slots, scales (base 2), takes its row max and writes it to row w of an
       SMEM f32 exchange; barrier `bar_max`; m_new = max(m_i, own, other's) (the same in both WGs);
    3. p_w = exp2(S_w - m_new), l_w = l_w·alpha + rowsum(p_w) (each WG sums its own slots; the
       total l_0 + l_1 is exchanged once after the loop);
    4. stores p_w (bf16) to its SMEM half P_w [64, 32]; barrier `bar_p`; loads both halves and
       joins them into the chunk's P [64, 64] in registers;
    5. acc_c = alpha·acc_c + P @ R[:, value tile c] over its half of the value columns (A from
       registers, K = 64: one wgmma per tile), then releases the operand slot.
  Why P goes back to registers rather than two K = 32 wgmmas with A = P_0, P_1 from SMEM: R is
  128-byte swizzled (the copy ops' layout), and Mosaic GPU's wgmma needs K to be a multiple of
  the swizzle width (64 bf16) and the same swizzle on both SMEM operands, so neither a K = 32 B
  slice of R nor a 64-byte-swizzled [64, 32] A operand can meet it (CUDA cross-lowering: A in
  registers with K = 32, "K must be a multiple of 64, got: 32"; A = P_w from SMEM with a 64-byte
  swizzle, "Failed to infer a possible set of layouts").

  Hazards (the two per-chunk barriers cover them, since every read of the exchange rows and of
  P_w, including the P·V wgmmas, completes before the WG's next arrive):
    - the max row w of chunk j + 1 is written after bar_p of chunk j, which the other WG reaches
      only after reading row w of chunk j;
    - P_w of chunk j + 1 is written after bar_max of chunk j + 1, which the other WG reaches only
      after it loaded P_w of chunk j (and finished that chunk's wgmmas; WG w's own load of P_w
      precedes its store in program order);
    - after the loop, row w takes l_w (the other WG's last max read came before bar_p), and WG0's
      lse tile has a row of its own (the other WG still reads l_0 after bar_end).

  The slot ids are staged per chunk (as in kernel_mosaic_gpu_bwd.py) in an SMEM ring of 4: chunk
  j's 64 ids (one TMA) into ring slot j % 4, on barrier bar_ids[j % 4]. WG0 fetches chunks 0..3
  (after the raw mbarriers' init, which the copy WG's first wait on bar_ids thereby orders); the
  copy WG fetches chunk j + 2 once bar_free says chunk j - 2 (the last user of ring slot
  (j + 2) % 4, read by the copy WG to issue and by the compute WGs for the mask) is released,
  i.e. two chunks ahead of its row copies. The compute WGs wait on bar_ids too (each waiter
  observes every phase).
  SMEM at V3.2 (Kp 576, bf16): q 72 KiB + operand slots 144 + P halves 8 + ids ring 1 + f32 rows
  1 + 10 barriers = 231504 bytes of 232448 (`smem_bytes`).
  The interpreter (no inline Mosaic GPU, A operands from SMEM only) copies rows with Pallas
  copies on bar_full and stores the joined P to a per-WG SMEM tile for the P·V wgmmas.
  """
  n, hp, kp_dim = q.shape
  kp = idx.shape[1]
  bk = BLOCK_K
  if hp % HEAD_BLOCK or kp_dim % 64 or kp % bk or d_out % 128 or d_out > kp_dim:
    raise ValueError(f"bad kernel layout: q {q.shape}, idx {idx.shape}, d_out={d_out}")
  if d_out > 512:  # each WG's P·V is one wgmma over d_out / 2 columns (wgmma N <= 256)
    raise ValueError(f"d_out={d_out}: the forward takes at most 512 value columns")
  if not fits(kp_dim, q.dtype.itemsize):
    need = smem_bytes(kp_dim, q.dtype.itemsize)
    raise ValueError(f"the forward needs {need} of {_SMEM_BYTES} bytes of SMEM at Kp={kp_dim}")
  n_chunks = kp // bk
  idx3 = idx.reshape(n, n_chunks, bk)  # chunk j's ids: one TMA into the ring
  half = bk // 2
  n_tiles = kp_dim // 64
  v_cols = d_out // 2  # value columns per compute WG
  v_tiles = v_cols // 64
  dtype = q.dtype
  qk_scale = scale * _LOG2E
  oob = plgpu.OOBFillMode.PROMISE_IN_BOUNDS
  f32 = jnp.float32
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  if not interpret:
    direct_init, direct_issue, mbarrier_wait = _direct_ops(bk, kp_dim * q.dtype.itemsize)

  def body(q_ref, kv_ref, idx_ref, o_ref, lse_ref, bufs, bars):
    q_smem, kv_smem, p_halves, p_smem, ids_ring, misc = bufs
    bar_q, bar_ids, bar_full, bar_free, bar_max, bar_p, bar_end = bars
    # misc (f32): rows 0, 1 the WGs' exchange (row max per chunk, then l), row 2 the lse tile,
    # row 3 [:4] the raw mbarriers (8 bytes each, one per operand slot).
    lse_smem, raw_bars = misc.at[2], misc.at[3, pl.ds(0, 4)]
    t = lax.axis_index("t")
    hb = lax.axis_index("h")
    wg = lax.axis_index("wg")
    heads = pl.ds(hb * HEAD_BLOCK, HEAD_BLOCK)

    def fetch_ids(j):
      r = j % IDS_RING
      plgpu.copy_gmem_to_smem(idx_ref.at[t, j], ids_ring.at[r], bar_ids.at[r], oob_mode=oob)

    @pl.when(wg == 0)
    def _():
      if not interpret:  # before the ids copies: their barriers order the init
        direct_init(raw_bars)
      for j in range(min(IDS_RING, n_chunks)):
        fetch_ids(j)
      for c in range(n_tiles):
        plgpu.copy_gmem_to_smem(q_ref.at[t, heads, pl.ds(c * 64, 64)], q_smem.at[c], bar_q)

    @pl.when(wg == 2)
    def _copy_wg():
      if not interpret:
        plgpu.set_max_registers(config.registers[1], action="decrease")

      def issue(j):
        r = j % IDS_RING
        plgpu.barrier_wait(bar_ids.at[r])
        issue_op = None if interpret else direct_issue
        issue_chunk(kv_ref, kv_smem, ids_ring.at[r], j % 2, bar_full, raw_bars, issue_op)

      issue(0)
      if n_chunks > 1:
        issue(1)

      @pl.loop(2, n_chunks)
      def _(j):
        # Chunk j - 2 is released by both compute WGs: its operand slot and ids ring slot are free.
        with jax.named_scope("slot_wait"):
          plgpu.barrier_wait(bar_free.at[j % 2])

        @pl.when(j + 2 < n_chunks)
        def _():
          fetch_ids(j + 2)

        with jax.named_scope("issue"):
          issue(j)

      for j in range(max(n_chunks - 2, 0), n_chunks):  # observe the last releases too
        plgpu.barrier_wait(bar_free.at[j % 2])

    def compute(w):
      if not interpret:
        plgpu.set_max_registers(config.registers[0], action="increase")
      plgpu.barrier_wait(bar_q)
      m_i = plgpu.layout_cast(jnp.full((HEAD_BLOCK,), -jnp.inf, f32), row_layout)
      l_i = plgpu.layout_cast(jnp.full((HEAD_BLOCK,), 0.0, f32), row_layout)
      acc = plgpu.layout_cast(jnp.full((HEAD_BLOCK, v_cols), 0.0, f32), plgpu.Layout.WGMMA)
      v_half = pl.ds(w * v_cols, v_cols)  # this WG's value columns
      mine = pl.ds(w * half, half)  # this WG's slots of a chunk

      def step(j, carry):
        acc, m_i, l_i = carry
        slot = j % 2
        # Named regions: what PROFILE records (no code of their own otherwise).
        with jax.named_scope("rows_wait"):
          if interpret:
            plgpu.barrier_wait(bar_full.at[slot])
          else:
            mbarrier_wait(raw_bars.at[pl.ds(slot * 2, 2)], (j // 2) % 2)
            plgpu.commit_smem()  # the cp.async writes (generic proxy) before wgmma reads them
          plgpu.barrier_wait(bar_ids.at[j % IDS_RING])
        operand = kv_smem.at[slot]

        def qk_scope(acc_ref):
          for c in range(n_tiles):
            plgpu.wgmma(acc_ref, q_smem.at[c], operand.at[mine, pl.ds(c * 64, 64)].T)
          return acc_ref[...]

        with jax.named_scope("qk"):
          s = pl.run_scoped(qk_scope, plgpu.ACC((HEAD_BLOCK, half), f32))
        ids = plgpu.load(
          ids_ring.at[j % IDS_RING, mine], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False
        )
        s = jnp.where(lax.broadcast_in_dim(ids >= 0, s.shape, [1]), s * qk_scale, -jnp.inf)
        m_own = s.max(axis=1)
        misc.at[w][...] = m_own
        with jax.named_scope("max_exchange"):
          plgpu.barrier_arrive(bar_max)
          plgpu.barrier_wait(bar_max)
        with jax.named_scope("softmax"):
          m_other = plgpu.load(misc.at[1 - w], layout=row_layout, optimized=False)
          m_new = jnp.maximum(m_i, jnp.maximum(m_own, m_other))  # commutative: same in both WGs
          m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all-invalid so far: exp finite
          alpha = jnp.exp2(m_i - m_use)
          p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
          l_i = l_i * alpha + p.sum(axis=1)
          p_halves.at[w][...] = p.astype(dtype)
        with jax.named_scope("p_exchange"):
          plgpu.barrier_arrive(bar_p)
          plgpu.barrier_wait(bar_p)
        # Both halves from SMEM (the own one too): one code path for both WGs.
        p = jnp.concatenate([p_halves.at[0][...], p_halves.at[1][...]], axis=1)  # [64, 64]
        if interpret:  # the interpreter reads A from SMEM only
          p_smem.at[w][...] = p
          plgpu.commit_smem()
          p = p_smem.at[w]
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        # One wgmma over the WG's whole value half (N = d_out / 2): one issue and one wait.
        with jax.named_scope("pv"):
          acc = _mma_acc(acc, p, operand.at[:, v_half], interpret)
        plgpu.barrier_arrive(bar_free.at[slot])  # this WG is done with the operand slot
        return acc, m_new, l_i

      acc, m_i, l_i = lax.fori_loop(0, n_chunks, step, (acc, m_i, l_i))
      # The total l; bar_end also says both WGs are past their last logits: q_smem takes the output.
      misc.at[w][...] = l_i
      plgpu.barrier_arrive(bar_end)
      plgpu.barrier_wait(bar_end)
      l_i = l_i + plgpu.load(misc.at[1 - w], layout=row_layout, optimized=False)
      has = l_i > 0
      l_safe = jnp.where(has, l_i, 1.0)
      inv = jnp.where(has, 1.0 / l_safe, 0.0)
      out = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
      v0 = w * v_tiles  # this WG's first value-column tile
      for c in range(v_tiles):
        q_smem.at[v0 + c][...] = out[:, c * 64 : (c + 1) * 64]
      plgpu.commit_smem()
      for c in range(v_tiles):
        cols = pl.ds((v0 + c) * 64, 64)
        plgpu.copy_smem_to_gmem(q_smem.at[v0 + c], o_ref.at[t, heads, cols])

      @pl.when(w == 0)
      def _():
        lse_smem[...] = jnp.where(has, m_i * _LN2 + jnp.log(l_safe), jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[t, heads])

      plgpu.wait_smem_to_gmem(0)

    # One code path for both compute WGs, w = wg traced (a copy of the loop per WG spills more
    # registers under ptxas' cap of 168 per thread).
    pl.when(wg < 2)(lambda: compute(wg))

  def sparse_mla_fwd_kernel(q_ref, kv_ref, idx_ref, o_ref, lse_ref):  # the name in profiles
    halves = (plgpu.TilingTransform((8, half)), plgpu.SwizzleTransform(half * dtype.itemsize))
    bufs = (
      _swizzled((n_tiles, HEAD_BLOCK, 64), dtype),  # q tile, then the output tile
      _swizzled((2, bk, kp_dim), dtype),  # two wgmma operand slots
      plgpu.SMEM((2, HEAD_BLOCK, half), dtype, transforms=halves),  # P_0, P_1
      _swizzled((2, HEAD_BLOCK, bk), dtype) if interpret else None,  # joined P (interpreter)
      plgpu.SMEM((IDS_RING, bk), jnp.int32),  # the ids ring
      plgpu.SMEM((4, HEAD_BLOCK), f32),  # exchange rows, lse tile, raw mbarriers
    )
    bars = (
      plgpu.Barrier(num_arrivals=n_tiles),  # q tile (one arrival per column-tile copy)
      plgpu.Barrier(num_arrivals=1, num_barriers=IDS_RING),  # a chunk's ids landed
      plgpu.Barrier(num_arrivals=bk, num_barriers=2) if interpret else None,  # rows (interp.)
      plgpu.Barrier(num_arrivals=2, num_barriers=2),  # operand slot released by both WGs
      plgpu.Barrier(num_arrivals=2),  # both row maxes written
      plgpu.Barrier(num_arrivals=2),  # both P halves written
      plgpu.Barrier(num_arrivals=2),  # both past the loop, l written
    )
    pl.run_scoped(
      lambda b, r: body(q_ref, kv_ref, idx_ref, o_ref, lse_ref, b, r),
      bufs,
      bars,
      collective_axes="wg",
    )

  out_type = (
    jax.ShapeDtypeStruct((n, hp, d_out), dtype),
    jax.ShapeDtypeStruct((n, hp), f32),
  )
  kern = token_kernel(sparse_mla_fwd_kernel, out_type, hp, n, WARPGROUPS, interpret)
  return kern(q, kv, idx3)
