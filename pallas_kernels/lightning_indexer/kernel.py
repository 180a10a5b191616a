# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Mosaic GPU (Hopper) FP8 lightning-indexer logits kernel.

  I[b,t,s] = ks[b,s] · Σ_j wq[b,t,j] · ReLU(q8[b,t,j] · k8[b,s])      (fp32, -inf for s > pos(t))

q8/k8 are e4m3 with per-128-vector power-of-two scales (dsa_spec.md §4.3 step 5); the q scale is
folded into wq and the k scale ks is applied per key after the head sum, both exact (powers of 2,
positive, so they commute with ReLU).

One CTA owns `block_q` queries of one batch row and walks the key blocks up to its causal bound
(blocks past it are only filled with -inf). Per key block and query t, one fp8 wgmma
  acc[J=64 heads, block_k keys] = q8[t] (64x128, K-major) @ k8_tile^T (K-major: k rows are D-contig)
then ReLU, scale rows by wq[t], reduce over heads (axis 0) -> one output row of block_k logits.
Key tiles are double buffered through TMA; output tiles go back through two SMEM slots.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

FP8 = jnp.float8_e4m3fn
HEADS = 64  # wgmma M: indexer heads form the rows of the accumulator
DIM = 128  # one quantisation block per head vector


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_q queries per CTA (q tile = block_q·64·128 B of SMEM); block_k keys per wgmma (N)."""

  block_q: int = 16
  block_k: int = 128

  def __post_init__(self):
    if self.block_q <= 0 or self.block_q % 8:
      raise ValueError(f"block_q={self.block_q} must be a positive multiple of 8")
    if self.block_k % 64 or not 64 <= self.block_k <= 256:
      raise ValueError(f"block_k={self.block_k} must be 64, 128, 192 or 256")

  @staticmethod
  def default_for(t: int, s: int) -> "BlockSizes":
    bq = 16 if t % 16 == 0 else 8
    bk = 128 if s % 128 == 0 else 64
    return BlockSizes(block_q=bq, block_k=bk)


def quantize_e4m3(x, axis=-1):
  """Per-vector (1x128) e4m3 quantisation with ue8m0 (power-of-two) scales, spec §4.3 step 5.

  Returns (x8 float8_e4m3fn, scale f32 with `axis` dropped). Re-quantising a tensor that already
  went through this quant-dequant round trip is exact.
  """
  xf = x.astype(jnp.float32)
  amax = jnp.maximum(jnp.max(jnp.abs(xf), axis=axis, keepdims=True), 1e-4)
  scale = jnp.exp2(jnp.ceil(jnp.log2(amax / 448.0)))
  x8 = jnp.clip(xf / scale, -448.0, 448.0).astype(FP8)
  return x8, jnp.squeeze(scale, axis)


def _transforms(itemsize: int, row_bytes: int):
  swizzle = plgpu.find_swizzle(row_bytes * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def logits_fp8(
  q8,
  k8,
  wq,
  ks,
  *,
  block_sizes: BlockSizes,
  causal: bool = True,
  q_offset: int | None = None,
  interpret=None,
):
  """q8 [B,T,64,128] e4m3, k8 [B,S,128] e4m3, wq [B,T,64] f32, ks [B,S] f32 -> [B,T,S] f32.

  Query t sits at key position q_offset + t (default S - T: the queries are the last T keys).
  """
  b, t, j, d = q8.shape
  s = k8.shape[1]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  if j != HEADS or d != DIM:
    raise ValueError(f"fp8 kernel needs J={HEADS}, D={DIM}; got J={j}, D={d}")
  if t % bq or s % bk:
    raise ValueError(f"T={t} % block_q={bq} and S={s} % block_k={bk} must be 0")
  nk = s // bk
  off = s - t if q_offset is None else q_offset
  q2 = q8.reshape(b, t * j, d)

  def body(
    q_ref,
    k_ref,
    w_ref,
    ks_ref,
    o_ref,
    q_smem,
    k_smem,
    w_smem,
    ks_smem,
    o_smem,
    neg_smem,
    q_bar,
    k_bar,
  ):
    bi = jax.lax.axis_index("b")
    qi = jax.lax.axis_index("q")
    q0 = qi * bq
    if causal:
      n_live = jnp.minimum(pl.cdiv(off + q0 + bq, bk), nk)
    else:
      n_live = jnp.int32(nk)

    plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q0 * j, bq * j)], q_smem, q_bar)
    plgpu.copy_gmem_to_smem(w_ref.at[bi, pl.ds(q0, bq)], w_smem, q_bar)

    def fetch(kb, slot):
      plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(kb * bk, bk)], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(ks_ref.at[bi, pl.ds(kb * bk, bk)], ks_smem.at[slot], k_bar.at[slot])

    fetch(0, 0)
    plgpu.barrier_wait(q_bar)

    def kv_step(kb, carry):
      slot = jax.lax.rem(kb, 2)

      @pl.when(kb + 1 < n_live)
      def _():
        fetch(kb + 1, 1 - slot)

      plgpu.barrier_wait(k_bar.at[slot])
      # the output slot written two steps ago must have left SMEM before we overwrite it
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)
      ksv = ks_smem[slot]
      kpos = kb * bk + plgpu.broadcasted_iota(
        jnp.int32, (bk,), 0, layout=plgpu.Layout.WGMMA.reduce(0)
      )

      def one_query(ti, c):
        def mma(acc_ref):
          plgpu.wgmma(acc_ref, q_smem.at[pl.ds(ti * j, j)], k_smem.at[slot].T)
          return acc_ref[...]

        z = pl.run_scoped(mma, plgpu.ACC((j, bk), jnp.float32))
        wv = w_smem[ti]
        r = jnp.maximum(z, 0.0) * jax.lax.broadcast_in_dim(wv, (j, bk), [0])
        v = jnp.sum(r, axis=0) * ksv
        if causal:
          v = jnp.where(kpos <= off + q0 + ti, v, -jnp.inf)
        o_smem[slot, ti] = v
        return c

      jax.lax.fori_loop(0, bq, one_query, 0)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[slot], o_ref.at[bi, pl.ds(q0, bq), pl.ds(kb * bk, bk)])
      return carry

    jax.lax.fori_loop(0, n_live, kv_step, 0)

    if causal:
      # key blocks wholly above the diagonal: write -inf tiles (no compute)
      neg_smem[...] = jnp.full((bq, bk), -jnp.inf, jnp.float32)
      plgpu.commit_smem()

      def dead(kb, c):
        plgpu.copy_smem_to_gmem(neg_smem, o_ref.at[bi, pl.ds(q0, bq), pl.ds(kb * bk, bk)])
        return c

      jax.lax.fori_loop(n_live, nk, dead, 0)
    plgpu.wait_smem_to_gmem(0)

  fp8_t = _transforms(1, d)
  kern = plgpu.kernel(
    body,
    out_type=jax.ShapeDtypeStruct((b, t, s), jnp.float32),
    scratch_types=[
      plgpu.SMEM((bq * j, d), FP8, transforms=fp8_t),
      plgpu.SMEM((2, bk, d), FP8, transforms=fp8_t),
      plgpu.SMEM((bq, j), jnp.float32),
      plgpu.SMEM((2, bk), jnp.float32),
      plgpu.SMEM((2, bq, bk), jnp.float32),
      plgpu.SMEM((bq, bk), jnp.float32),
      plgpu.Barrier(num_arrivals=2),
      plgpu.Barrier(num_arrivals=2, num_barriers=2),
    ],
    grid=(b, t // bq),
    grid_names=("b", "q"),
    compiler_params=plgpu.CompilerParams(),
    interpret=interpret,
  )
  return kern(q2, k8, wq.astype(jnp.float32), ks.astype(jnp.float32))


def prepare_fp8(q, k, w):
  """Float (fake-quantised) q [B,T,J,D], k [B,S,D], w [B,T,J] -> (q8, k8, wq, ks) for the kernel."""
  q8, qs = quantize_e4m3(q)
  k8, ks = quantize_e4m3(k)
  return q8, k8, w.astype(jnp.float32) * qs, ks


@functools.partial(jax.jit, static_argnames=("block_sizes", "causal", "interpret"))
def indexer_logits_fp8(q, k, w, *, block_sizes=None, causal=True, interpret=None):
  bs = block_sizes or BlockSizes.default_for(q.shape[1], k.shape[1])
  return logits_fp8(*prepare_fp8(q, k, w), block_sizes=bs, causal=causal, interpret=interpret)
