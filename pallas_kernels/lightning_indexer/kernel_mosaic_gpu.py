# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Mosaic GPU (Hopper) FP8 lightning-indexer logits kernel.

  I[b,t,s] = ks[b,s] · Σ_j wq[b,t,j] · ReLU(q8[b,t,j] · k8[b,s])      (fp32, -inf for s > pos(t))

q8/k8 are e4m3 with per-128-vector power-of-two scales (docs/dsa.md §Indexer); the q scale is
folded into wq and the k scale ks is applied per key after the head sum, both exact (powers of 2,
positive, so they commute with ReLU).

One CTA owns `block_q` queries of one batch row and walks the key blocks up to its causal bound
(blocks past it are only filled with -inf). Two layouts (BlockSizes.variant; default_for picks
keys_m, and heads_m where T % 16 or S % 128 rules keys_m's tiles out):

heads_m: per key block and query t, one fp8 wgmma
  acc[J=64 heads, block_k keys] = q8[t] (64x128, K-major) @ k8_tile^T (K-major: k rows are D-contig)
then ReLU, scale rows by wq[t], reduce over heads (axis 0, across warps) -> one output row.
Key tiles are double buffered through TMA; output tiles go back through two SMEM slots.

keys_m (DeepGEMM's mqa-logits layout): per key block and group of q_per_mma queries
  acc[keys, q_per_mma·64] = k8_tile (K-major) @ q8[group]^T (K-major)
so the head sum runs along N, inside each thread plus a 4-lane shuffle. Warp specialised: one
producer warpgroup streams key tiles through a TMA ring, 2 consumer warpgroups split each tile's
keys and overlap each other's wgmma with their epilogues.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

FP8 = jnp.float8_e4m3fn
HEADS = 64  # indexer heads: the wgmma M of heads_m, 64-column groups of N in keys_m
DIM = 128  # one quantisation block per head vector
VARIANTS = ("heads_m", "keys_m")
CONSUMER_WGS = 2  # keys_m: consumer warpgroups, each owning block_k / 2 keys of every key tile


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the FP8 logits kernel.

  variant "heads_m": the 64 heads are the wgmma M dimension (one query per wgmma, block_k keys on
  N) and the head sum is a cross-warp reduction over the accumulator's rows.
  variant "keys_m": keys are M and (q_per_mma queries x 64 heads) are N, so the head sum runs
  along the accumulator's rows inside each thread (plus a 4-lane shuffle); a producer warpgroup
  streams key tiles through `stages` TMA slots to 2 consumer warpgroups, each owning block_k / 2
  keys of every tile. Mosaic's automatic warpgroup barriers around SMEM stores are off (safe here:
  threads only write the output tiles, which are fenced by the TMA waits and commit_smem, and only
  read TMA-written tiles).

  block_q queries per CTA (q tile = block_q·64·128 B of SMEM); block_k keys per step.
  """

  block_q: int = 16
  block_k: int = 128
  variant: str = "heads_m"
  q_per_mma: int = 2
  stages: int = 2

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"variant={self.variant!r}; expected one of {VARIANTS}")
    if self.block_q <= 0 or self.block_q % 8:
      raise ValueError(f"block_q={self.block_q} must be a positive multiple of 8")
    if self.block_k % 64 or not 64 <= self.block_k <= 256:
      raise ValueError(f"block_k={self.block_k} must be 64, 128, 192 or 256")
    if self.variant == "keys_m":
      mk, n = self.block_k // CONSUMER_WGS, self.q_per_mma * HEADS
      if mk % 64:
        raise ValueError(
          f"keys_m: block_k={self.block_k} must be a multiple of 64 x {CONSUMER_WGS}"
        )
      if self.q_per_mma not in (1, 2, 4) or self.block_q % self.q_per_mma:
        raise ValueError(f"q_per_mma={self.q_per_mma} must be 1, 2 or 4 and divide block_q")
      # f32 accumulator registers per thread must leave room for the epilogue
      if mk * n > 128 * 128:
        raise ValueError(f"accumulator {mk}x{n} exceeds 128 regs/thread")
      if self.stages < 2:
        raise ValueError(f"stages={self.stages} must be >= 2")

  @staticmethod
  def default_for(t: int, s: int) -> "BlockSizes":
    if t % 16 == 0 and s % 128 == 0:
      # keys_m: the fastest in the 2026-11-29 indexer sweep (lab log).
      return BlockSizes(block_q=16, block_k=128, variant="keys_m", q_per_mma=4, stages=3)
    bq = 16 if t % 16 == 0 else 8
    bk = 128 if s % 128 == 0 else 64
    return BlockSizes(block_q=bq, block_k=bk)


def quantize_e4m3(x, axis=-1):
  """Per-vector (1x128) e4m3 quantisation with ue8m0 (power-of-two) scales, docs/dsa.md §Indexer.

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
  ratio: int = 1,
  interpret=None,
):
  """q8 [B,T,64,128] e4m3, k8 [B,S,128] e4m3, wq [B,T,64] f32, ks [B,S] f32 -> [B,T,S] f32.

  Query t sits at position p = q_offset + t (default S - T: the queries are the last T keys).
  causal: key s is scored iff s < (p + 1) // ratio, -inf otherwise. ratio=1 is the token-level
  causal rule (s <= p); ratio=m > 1 is DeepSeek-V4's block-causal rule over compressed entries of
  m tokens each (entry s is complete once token (s+1)·m − 1 is seen), with q_offset then
  defaulting to 0 (the queries are tokens 0..T-1). Key blocks wholly past a CTA's last query's
  bound are skipped (written -inf) in both cases.
  """
  b, t, j, d = q8.shape
  s = k8.shape[1]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  if j != HEADS or d != DIM:
    raise ValueError(f"fp8 kernel needs J={HEADS}, D={DIM}; got J={j}, D={d}")
  if t % bq or s % bk:
    raise ValueError(f"T={t} % block_q={bq} and S={s} % block_k={bk} must be 0")
  if ratio < 1:
    raise ValueError(f"ratio={ratio} must be >= 1")
  off = (s - t if ratio == 1 else 0) if q_offset is None else q_offset
  impl = _logits_keys_m if block_sizes.variant == "keys_m" else _logits_heads_m
  return impl(q8, k8, wq, ks, block_sizes, causal, off, interpret, ratio)


def _live_blocks(off, q0, bq, bk, nk, ratio):
  """Key blocks holding a key visible to some query of the CTA (its last query has the most)."""
  if ratio == 1:
    return jnp.minimum(pl.cdiv(off + q0 + bq, bk), nk)
  # at least one: heads_m issues block 0's TMA before its loop (a block with no visible key is
  # scored and masked, e.g. the first CTAs when ratio > block_q)
  return jnp.clip(pl.cdiv((off + q0 + bq) // ratio, bk), 1, nk)


def _visible(kpos, pos, ratio):
  """Key ids kpos (vector) visible to the query at position pos (scalar): s < (pos+1)//ratio,
  written s·ratio + ratio − 1 <= pos so the vector side needs no division."""
  if ratio == 1:
    return kpos <= pos
  return kpos * ratio + (ratio - 1) <= pos


def _logits_heads_m(q8, k8, wq, ks, block_sizes, causal, off, interpret, ratio=1):
  b, t, j, d = q8.shape
  s = k8.shape[1]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  nk = s // bk
  q2 = q8.reshape(b, t * j, d)

  def indexer_logits_heads_m_kernel(  # the name in profiles
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
      n_live = _live_blocks(off, q0, bq, bk, nk, ratio)
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
          v = jnp.where(_visible(kpos, off + q0 + ti, ratio), v, -jnp.inf)
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
    indexer_logits_heads_m_kernel,
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


def _logits_keys_m(q8, k8, wq, ks, block_sizes, causal, off, interpret, ratio=1):
  """Keys on wgmma M: acc[mk keys, nq·64] = k8_tile @ q8[nq queries·64 heads]^T per query group.

  Warp specialised: warpgroup `nwg` (the producer) loads the CTA's q/w tiles once and streams key
  tiles through `stages` TMA slots; consumer warpgroup c owns keys [c·mk, (c+1)·mk) of every tile
  and writes its own [block_q, mk] output tile, so consumers never synchronise with each other.
  """
  b, t, j, d = q8.shape
  s = k8.shape[1]
  bs = block_sizes
  bq, bk, nq, nst, nwg = bs.block_q, bs.block_k, bs.q_per_mma, bs.stages, CONSUMER_WGS
  mk, n = bk // nwg, nq * j  # wgmma M (keys per consumer) and N (query-heads per wgmma)
  ng, nk, nqb = bq // nq, s // bk, t // bq
  q2 = q8.reshape(b, t * j, d)
  w2 = wq.astype(jnp.float32).reshape(b, t // nq, n)  # one row per query group (TMA box <= 256)
  row = plgpu.Layout.WGMMA.reduce(1)  # one value per accumulator row (= key)

  def indexer_logits_kernel(
    q_ref, k_ref, w_ref, ks_ref, o_ref, q_smem, k_smem, w_smem, ks_smem, o_smem, bars
  ):
    q_bar, k_bar, k_free = bars
    bi = jax.lax.axis_index("b")
    qi = nqb - 1 - jax.lax.axis_index("q")  # longest causal rows first: less tail imbalance
    wg = jax.lax.axis_index("wg")
    q0 = qi * bq
    if causal:
      n_live = _live_blocks(off, q0, bq, bk, nk, ratio)
    else:
      n_live = jnp.int32(nk)

    # 3 warpgroups share 64K registers: move them from the producer to the consumers
    @pl.when(wg == nwg)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q0 * j, bq * j)], q_smem, q_bar)
      plgpu.copy_gmem_to_smem(w_ref.at[bi, pl.ds(qi * ng, ng)], w_smem, q_bar)

      @pl.loop(0, n_live)
      def _fetch(kb):
        slot = jax.lax.rem(kb, nst)

        @pl.when(kb >= nst)
        def _():
          plgpu.barrier_wait(k_free.at[slot])
          # consumers read ks through the generic proxy; order that before the TMA overwrite
          # (GPU interpret's race detector flags the slot reuse without this proxy fence)
          plgpu.commit_smem()

        keys = pl.ds(kb * bk, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, keys], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(ks_ref.at[bi, keys], ks_smem.at[slot], k_bar.at[slot])

      # observe the last releases too: every barrier phase is then seen by each waiting thread
      @pl.loop(jnp.maximum(n_live - nst, 0), n_live)
      def _drain(kb):
        plgpu.barrier_wait(k_free.at[jax.lax.rem(kb, nst)])

    @pl.when(wg < nwg)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      plgpu.barrier_wait(q_bar)
      kloc = wg * mk + plgpu.broadcasted_iota(jnp.int32, (mk,), 0, layout=row)

      def epilogue(z, g, ksv, kpos, oslot):
        wv = w_smem[g]
        r = jnp.maximum(z, 0.0) * jax.lax.broadcast_in_dim(wv, (mk, n), [1])
        for i in range(nq):
          v = jnp.sum(r[:, i * j : (i + 1) * j], axis=1) * ksv
          # the select also pins v's layout: without it Mosaic's layout inference fails (H200)
          if causal:
            v = jnp.where(_visible(kpos, off + q0 + g * nq + i, ratio), v, -jnp.inf)
          else:
            v = jnp.where(kpos <= jnp.int32(2**30), v, -jnp.inf)
          o_smem[wg, oslot, g * nq + i] = v

      def kv_step(kb, carry):
        slot = jax.lax.rem(kb, nst)
        oslot = jax.lax.rem(kb, 2)
        plgpu.barrier_wait(k_bar.at[slot])
        # the output slot stored two steps ago must have left SMEM before we overwrite it
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        a = k_smem.at[slot, pl.ds(wg * mk, mk)]
        ksv = ks_smem[slot, pl.ds(wg * mk, mk)]
        kpos = kb * bk + kloc

        def qg(g):
          return q_smem.at[pl.ds(g * n, n)].T

        for g in range(ng):

          def mma(acc_ref, g=g):
            plgpu.wgmma(acc_ref, a, qg(g))
            return acc_ref[...]

          z = pl.run_scoped(mma, plgpu.ACC((mk, n), jnp.float32))
          epilogue(z, g, ksv, kpos, oslot)
        plgpu.barrier_arrive(k_free.at[slot])  # all wgmmas reading this slot have completed
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
          o_smem.at[wg, oslot], o_ref.at[bi, pl.ds(q0, bq), pl.ds(kb * bk + wg * mk, mk)]
        )
        return carry

      jax.lax.fori_loop(0, n_live, kv_step, 0)

      if causal:
        # key blocks wholly above the diagonal: -inf tiles (no compute), from a free output slot
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        o_smem[wg, 0] = jnp.full((bq, mk), -jnp.inf, jnp.float32)
        plgpu.commit_smem()

        @pl.loop(n_live, nk)
        def _dead(kb):
          plgpu.copy_smem_to_gmem(
            o_smem.at[wg, 0], o_ref.at[bi, pl.ds(q0, bq), pl.ds(kb * bk + wg * mk, mk)]
          )

      plgpu.wait_smem_to_gmem(0)

  fp8_t = _transforms(1, d)
  kern = plgpu.kernel(
    indexer_logits_kernel,
    out_type=jax.ShapeDtypeStruct((b, t, s), jnp.float32),
    scratch_types=[
      plgpu.SMEM((bq * j, d), FP8, transforms=fp8_t),
      plgpu.SMEM((nst, bk, d), FP8, transforms=fp8_t),
      plgpu.SMEM((ng, n), jnp.float32),
      plgpu.SMEM((nst, bk), jnp.float32),
      plgpu.SMEM((nwg, 2, bq, mk), jnp.float32),
      (
        plgpu.Barrier(num_arrivals=2),
        plgpu.Barrier(num_arrivals=2, num_barriers=nst),
        plgpu.Barrier(num_arrivals=nwg, num_barriers=nst),
      ),
    ],
    grid=(b, nqb),
    grid_names=("b", "q"),
    num_threads=nwg + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=True),
    interpret=interpret,
  )
  return kern(q2, k8, w2, ks.astype(jnp.float32))


def prepare_fp8(q, k, w):
  """Float (fake-quantised) q [B,T,J,D], k [B,S,D], w [B,T,J] -> (q8, k8, wq, ks) for the kernel."""
  q8, qs = quantize_e4m3(q)
  k8, ks = quantize_e4m3(k)
  return q8, k8, w.astype(jnp.float32) * qs, ks


@functools.partial(jax.jit, static_argnames=("block_sizes", "causal", "interpret"))
def indexer_logits_fp8(q, k, w, *, block_sizes=None, causal=True, interpret=None):
  bs = block_sizes or BlockSizes.default_for(q.shape[1], k.shape[1])
  return logits_fp8(*prepare_fp8(q, k, w), block_sizes=bs, causal=causal, interpret=interpret)
