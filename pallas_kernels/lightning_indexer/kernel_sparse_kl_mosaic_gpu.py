# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Mosaic GPU (Hopper) backward of the sparse-phase indexer KL (the forward and the math:
kernel_sparse_kl_triton.py, grad.py).

Why a second backward: the Pallas-Triton one adds each token's dk rows with one f32 atomic per
element, and Pallas-Triton emits them as `atom.acq_rel`; this kernel adds the same rows with
relaxed `red.global.add.v4.f32` (the sparse-MLA backward's inline op), and spends its tensor-core
work in wgmma.

Layout the wrapper hands to the kernel (batch folded into rows):
  q   [N, 64, Dp]     N = B*T tokens, heads zero-padded to 64 (one CTA = one token x 64 heads),
                      Dp = D padded to 64s; bf16 / f16
  k   [R, Dp]         R = B*S key rows
  idx [N, kp/64, 64]  int32 global row ids, -1 for invalid slots and the padding to kp
  a   [N, kp/64, 64]  f32 p*dl at slots that count (valid, p > 0), else 0
  tok [N, 2, 64]      f32 row 0 the forward's lse_I, row 1 ps*dl, broadcast over 64 lanes
  w   [N, 64]         f32 head weights (0 on padded heads)
Per 64-slot chunk the rows are gathered with the sparse-MLA forward's direct `cp.async` copies
(a copy warpgroup, two operand slots; compute warpgroup w takes the chunks j = w mod 2), and:
  zᵀ = R·qᵀ [slots, heads] (wgmma; transposed so the head sum is a row sum inside a warp),
  I = Σ_j w_j·ReLU(z), g = exp(I - lse_I)·ps·dl - p·dl at valid slots,
  g1 = g·1[z > 0], gz = g1·w (both bf16 in SMEM),
  D += g1ᵀ·R [heads, Dp] (registers, over the warpgroup's chunks),
  dR = gz·q [slots, Dp] -> dk[ids] with relaxed red.global.add.v4.f32 (ids < 0 add zero rows
  to row 0).
Then dq_j = w_j·D_j and dw_j = q_j·D_j (= Σ_s g_s·ReLU(z_sj), since w_j is constant over the
slots), which the wrapper computes from the two warpgroups' D tiles [N, 2, 64, Dp] f32.
The interpreter has no inline Mosaic GPU: there the rows are Pallas copies and dR is added one
row at a time into one dk copy per warpgroup (plain read-modify-writes, which two warpgroups
would race on), so the CPU tests check the math (repeated ids included) but not the reds.
SMEM at V3.2 (Dp 128, k 2048, bf16): q 16 KiB + two operand slots 32 + the token's ids 8 + g1/gz
of both warpgroups 32 + the D stages 32 = 120 KiB (`smem_bytes`; 168 KiB at Dp 256).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common
from pallas_kernels.sparse_mla import kernel_mosaic_gpu as mla_fwd
from pallas_kernels.sparse_mla import kernel_mosaic_gpu_bwd as mla_bwd

HEADS = mla_fwd.HEAD_BLOCK  # 64: J is padded to one head block
BLOCK_K = mla_fwd.BLOCK_K  # 64 slots per chunk
MAX_DIM = 256


def smem_bytes(dp: int, n_slots: int, itemsize: int = 2) -> int:
  """SMEM the kernel asks for (module docstring), each buffer rounded up to whole KiB."""
  kib = lambda x: -(-x // 1024) * 1024
  chunks = -(-n_slots // BLOCK_K)
  return (
    kib(HEADS * dp * itemsize)  # q
    + kib(2 * BLOCK_K * dp * itemsize)  # two operand slots
    + kib(4 * chunks * BLOCK_K)  # the token's ids
    + 2 * kib(2 * BLOCK_K * HEADS * itemsize)  # g1, gz
    + kib(2 * HEADS * 64 * 4)  # D stages
    + kib(4 * BLOCK_K)  # raw mbarriers
  )


def supported(q, k, n_slots: int) -> str | None:
  """None when this backward takes these shapes (q [B,T,J,D], k [B,S,D], n_slots = k), else
  why not."""
  j, d = q.shape[-2:]
  if j > HEADS:
    return f"indexer heads J={j} > {HEADS}"
  if -(-d // 64) * 64 > MAX_DIM:
    return f"indexer head dim D={d} > {MAX_DIM}"
  for name, x in (("q", q), ("k", k)):
    if x.dtype not in (jnp.bfloat16, jnp.float16):
      return f"{name} dtype {x.dtype} (the wgmma operands need bf16 or f16)"
  if q.dtype != k.dtype:
    return f"q {q.dtype} and k {k.dtype} differ"
  if -(-n_slots // BLOCK_K) > mla_fwd._MAX_IDX_CHUNKS:
    return f"k={n_slots} slots: the token's ids exceed one TMA box"
  need = smem_bytes(-(-d // 64) * 64, n_slots, q.dtype.itemsize)
  if need > mla_fwd._SMEM_BYTES:
    return f"needs {need} bytes of SMEM at D={d}, k={n_slots} (of {mla_fwd._SMEM_BYTES})"
  return None


def _kernel(q, k, idx3, a3, tok, w, *, interpret):
  """The Mosaic GPU call on kernel-layout operands (module docstring) -> (D [N, 2, 64, Dp] f32,
  dk [R, Dp] f32)."""
  n, _, dp = q.shape
  n_chunks, bk = idx3.shape[1:]
  n_tiles = dp // 64
  dtype = q.dtype
  if not interpret:
    direct_init, direct_issue, mbarrier_wait = mla_fwd._direct_ops(bk, dp * dtype.itemsize)
    red_ops = {c: mla_bwd._red_add_op(dp, c * 64) for c in range(n_tiles)}

  def body(q_ref, k_ref, idx_ref, a_ref, tok_ref, w_ref, dk_ref, d_ref, bufs, bars):
    q_smem, k_smem, idx_smem, g1_all, gz_all, d_stage, misc, stage = bufs
    bar_q, bar_idx, bar_full, bar_free = bars
    raw_bars = misc.at[pl.ds(0, 4)]  # the two slots' raw mbarriers (direct copies)
    t = lax.axis_index("t")
    wg = lax.axis_index("wg")

    @pl.when(wg == 0)
    def _():
      if not interpret:  # before the idx copy: its barrier orders the init for every WG
        direct_init(raw_bars)
      for c in range(n_tiles):
        plgpu.copy_gmem_to_smem(q_ref.at[t, :, pl.ds(c * 64, 64)], q_smem.at[c], bar_q)
      plgpu.copy_gmem_to_smem(
        idx_ref.at[t], idx_smem, bar_idx, oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS
      )

    @pl.when(wg == 2)
    def _copy_wg():
      issue_op = None if interpret else direct_issue
      mla_fwd.copy_wg_direct(
        k_ref, k_smem, idx_smem, bar_idx, bar_free, bar_full, raw_bars, issue_op
      )

    def add_rows(w, j, c, acc):
      """dk[ids[t, j, s], c-th 64 columns] += acc[s] for the chunk's 64 slots."""
      if not interpret:
        red_ops[c](dk_ref, idx_ref, acc, t, j)
        return
      st = stage.at[w]
      st[...] = acc

      @pl.loop(0, bk)
      def _(i):
        row = jnp.maximum(idx_ref[t, j, i], 0)
        dst = dk_ref.at[w, pl.ds(row, 1), pl.ds(c * 64, 64)]
        dst[...] = dst[...] + st.at[pl.ds(i, 1)][...]

    def compute(w):
      plgpu.barrier_wait(bar_q)
      plgpu.barrier_wait(bar_idx)
      row_vec = plgpu.Layout.WGMMA.reduce(1)  # one value per slot (row of zᵀ)
      w_h = plgpu.load(w_ref.at[t], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
      lse = plgpu.load(tok_ref.at[t, 0], layout=row_vec, optimized=False)
      coef = plgpu.load(tok_ref.at[t, 1], layout=row_vec, optimized=False)
      # dynamic indices: a static one inside the accumulating wgmma's run_state does not lower
      g1_smem, gz_smem = g1_all.at[wg], gz_all.at[wg]

      def chunk(i, accs):
        j = 2 * i + w
        rows = k_smem.at[j % 2]
        wait = None if interpret else mbarrier_wait
        z = mla_fwd.chunk_logits_t(rows, q_smem, wait, w, i, bar_full, raw_bars, interpret)
        ids = plgpu.load(idx_smem.at[j], layout=row_vec, optimized=False)
        a = plgpu.load(a_ref.at[t, j], layout=row_vec, optimized=False)
        wb = lax.broadcast_in_dim(w_h, z.shape, [1])
        i_s = jnp.sum(jnp.maximum(z, 0.0) * wb, axis=1)
        g = jnp.where(ids >= 0, jnp.exp(i_s - lse) * coef - a, 0.0)
        g1 = jnp.where(z > 0.0, lax.broadcast_in_dim(g, z.shape, [0]), 0.0)
        g1_smem[...] = g1.astype(dtype)
        gz_smem[...] = (g1 * wb).astype(dtype)
        plgpu.commit_smem()
        accs = tuple(
          mla_fwd.mma_add(acc, g1_smem.T, rows.at[:, pl.ds(c * 64, 64)], interpret)
          for c, acc in enumerate(accs)
        )
        plgpu.barrier_arrive(bar_free.at[w])  # the slot's rows are read
        for c in range(n_tiles):

          def drows(acc_ref, c=c):
            plgpu.wgmma(acc_ref, gz_smem, q_smem.at[c])
            return acc_ref[...]

          add_rows(w, j, c, pl.run_scoped(drows, plgpu.ACC((bk, 64), jnp.float32)))
        return accs

      zeros = plgpu.layout_cast(jnp.zeros((HEADS, 64), jnp.float32), plgpu.Layout.WGMMA)
      accs = lax.fori_loop(0, (n_chunks - w + 1) // 2, chunk, (zeros,) * n_tiles)
      for c, acc in enumerate(accs):  # one 16 KiB stage per warpgroup, tile after tile
        plgpu.wait_smem_to_gmem(0)
        d_stage.at[w][...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(d_stage.at[w], d_ref.at[t, w, :, pl.ds(c * 64, 64)])
      plgpu.wait_smem_to_gmem(0)

    for w_ in range(2):
      pl.when(wg == w_)(functools.partial(compute, w_))

  def sparse_kl_bwd_mosaic(q_ref, k_ref, idx_ref, a_ref, tok_ref, w_ref, dk_ref, d_ref):
    sw = mla_fwd._swizzled
    bufs = (
      sw((n_tiles, HEADS, 64), dtype),  # q column tiles
      sw((2, bk, dp), dtype),  # two operand slots (the gathered rows)
      plgpu.SMEM((n_chunks, bk), jnp.int32),  # the token's slot ids
      sw((2, bk, HEADS), dtype),  # g1 of each compute warpgroup
      sw((2, bk, HEADS), dtype),  # gz of each compute warpgroup
      plgpu.SMEM((2, HEADS, 64), jnp.float32),  # a D tile on its way out, per warpgroup
      plgpu.SMEM((bk,), jnp.int32),  # raw mbarriers
      plgpu.SMEM((2, bk, 64), jnp.float32) if interpret else None,  # dR rows (interpreter)
    )
    bars = mla_fwd.single_pass_barriers(n_tiles, bk, interpret)
    pl.run_scoped(
      lambda b, r: body(q_ref, k_ref, idx_ref, a_ref, tok_ref, w_ref, dk_ref, d_ref, b, r),
      bufs,
      bars,
      collective_axes="wg",
    )

  out_type = jax.ShapeDtypeStruct((n, 2, HEADS, dp), jnp.float32)
  kern = mla_fwd.token_kernel(sparse_kl_bwd_mosaic, out_type, HEADS, n, 3, interpret)
  # the interpreter's adds are read-modify-writes, so each warpgroup adds into its own copy
  dk = jax.new_ref(jnp.zeros(((2,) if interpret else ()) + (k.shape[0], dp), jnp.float32))
  d = kern(q, k, idx3, a3, tok, w, dk)
  dk = jax.freeze(dk)
  return d, (jnp.sum(dk, axis=0) if interpret else dk)


@functools.partial(jax.jit, static_argnames=("interpret",))
def sparse_kl_bwd(q, k, w, idx, p, res, dl, *, interpret=False):
  # interpret: True (or plgpu.InterpretGPUParams) runs the GPU interpreter on CPU
  """(dq, dk, dw) of Σ_t dl[t]·kl[t] from kernel_sparse_kl_triton.sparse_kl_fwd's residuals
  (lse_I [N], ps [N]); q [B,T,J,D], k [B,S,D], w [B,T,J], idx [B,T,k] (-1 or >= S: invalid),
  p [B,T,k]. Needs `supported(q, k, k) is None`; gradients in q's, k's, w's dtypes."""
  why = supported(q, k, idx.shape[-1])
  if why:
    raise ValueError(f"sparse-KL Mosaic GPU backward: {why}")
  b, t, nj, d = q.shape
  s = k.shape[1]
  n = b * t
  dp = -(-d // 64) * 64
  lse, ps = res
  qp = _common.pad_axis(_common.pad_axis(q, 3, dp), 2, HEADS).reshape(n, HEADS, dp)
  kp = _common.pad_axis(k, 2, dp).reshape(b * s, dp)
  wp = _common.pad_axis(w.astype(jnp.float32), 2, HEADS).reshape(n, HEADS)
  valid = (idx >= 0) & (idx < s)
  gid = jnp.where(valid, idx + (jnp.arange(b, dtype=jnp.int32) * s)[:, None, None], -1)
  gid = _common.pad_axis(gid.astype(jnp.int32), 2, BLOCK_K, value=-1).reshape(n, -1, BLOCK_K)
  dl = dl.astype(jnp.float32).reshape(n)
  pf = p.astype(jnp.float32)
  a = jnp.where(valid & (pf > 0), pf, 0.0) * dl.reshape(b, t, 1)
  a = _common.pad_axis(a, 2, BLOCK_K).reshape(gid.shape)
  tok = jnp.broadcast_to(jnp.stack([lse, ps * dl], axis=1)[:, :, None], (n, 2, HEADS))
  if interpret is True:
    interpret = plgpu.InterpretGPUParams()
  dsum, dk = _kernel(qp, kp, gid, a, tok, wp, interpret=interpret or False)
  dsum = jnp.sum(dsum, axis=1)  # the two warpgroups' chunks
  dq = wp[..., None] * dsum
  dw = jnp.sum(qp.astype(jnp.float32) * dsum, axis=-1)
  dq = dq.reshape(b, t, HEADS, dp)[:, :, :nj, :d].astype(q.dtype)
  dk = dk.reshape(b, s, dp)[..., :d].astype(k.dtype)
  dw = dw.reshape(b, t, HEADS)[..., :nj].astype(w.dtype)
  return dq, dk, dw
