# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Exact per-row top-k as a radix threshold select (no sort), one program per row.

Algorithm (per row of f32 scores, -inf = masked, only the first `length` columns scanned):
  1. Map each score to an order-preserving uint32 key (sign-flip trick). Like lax.top_k this is a
     total order: -0.0 ranks below +0.0.
  2. Radix search from the most significant digit, `radix_bits` at a time: for the 2^radix_bits
     candidate prefixes count the valid keys >= candidate (a [2^b, chunk] compare-and-sum per
     chunk, so no histogram scatter is needed), keep the largest digit whose count is >= k.
     After 32 / radix_bits passes the prefix is tau, the exact k-th largest key.
  3. One counting pass: G = #keys > tau, NV = #valid keys; the row keeps min(k, NV) keys.
  4. One compaction pass: every key > tau, plus the first (min(k, NV) - G) keys == tau in index
     order (so ties go to the lower index, like lax.top_k), scattered to their prefix-sum slot.
Output: [rows, k] int32 in ascending key-index order (not score order), -1 in unused slots.

Rows with length <= k skip the radix passes (all valid keys are taken). Written against the Pallas
Triton lowering (pointer-style masked loads, vector-indexed store); on CPU it runs under
interpret=True. Passes re-read the row from HBM/L2: each pass is a streaming scan.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """chunk: columns per vector step (power of 2); radix_bits: digit width (divides 32)."""

  chunk: int = 512
  radix_bits: int = 4
  num_warps: int = 4

  def __post_init__(self):
    if self.chunk <= 0 or self.chunk & (self.chunk - 1):
      raise ValueError(f"chunk={self.chunk} must be a power of 2")
    if self.radix_bits not in (1, 2, 4, 8):
      raise ValueError(f"radix_bits={self.radix_bits} must be one of 1, 2, 4, 8")

  @staticmethod
  def default_for(n_cols: int) -> "BlockSizes":
    return BlockSizes(chunk=min(512, max(16, pl.next_power_of_2(n_cols))))


def _keys(x):
  """f32 -> order-preserving uint32 (larger float -> larger key); valid = finite or +inf."""
  b = jax.lax.bitcast_convert_type(x, jnp.uint32)
  neg = (b >> 31) == 1
  key = jnp.where(neg, ~b, b | jnp.uint32(0x80000000))
  return key, x > -jnp.inf


def _select_kernel(len_ref, x_ref, o_ref, *, k, kp, chunk, radix_bits):
  r = pl.program_id(0)
  length = len_ref[r]
  n_chunks = pl.cdiv(length, chunk)
  iota = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)

  def load(c):
    cols = c * chunk + iota
    x = pltriton.load(x_ref.at[r, pl.ds(c * chunk, chunk)], mask=cols < length, other=-jnp.inf)
    return _keys(x)

  # Radix passes; skipped (0 chunks) when the row has no more than k candidates.
  n_radix = jnp.where(length > k, n_chunks, 0)
  nb = 1 << radix_bits
  digits = jax.lax.broadcasted_iota(jnp.uint32, (nb, 1), 0)
  prefix = jnp.uint32(0)
  for p in range(32 // radix_bits):
    shift = 32 - radix_bits * (p + 1)
    cand = prefix | (digits << shift)  # [nb, 1]

    def count(c, cnt, cand=cand):
      key, valid = load(c)
      ge = (key[None, :] >= cand) & valid[None, :]
      return cnt + jnp.sum(ge.astype(jnp.int32), axis=1, keepdims=True)

    cnt = jax.lax.fori_loop(0, n_radix, count, jnp.zeros((nb, 1), jnp.int32))
    # counts are non-increasing in the digit: the kept digit is (#digits with count >= k) - 1
    d = jnp.maximum(jnp.sum((cnt >= k).astype(jnp.int32)) - 1, 0).astype(jnp.uint32)
    prefix = prefix | (d << shift)
  tau = prefix

  def count_gt(c, carry):
    g, nv = carry
    key, valid = load(c)
    g += jnp.sum((valid & (key > tau)).astype(jnp.int32))
    nv += jnp.sum(valid.astype(jnp.int32))
    return g, nv

  g, nv = jax.lax.fori_loop(0, n_chunks, count_gt, (jnp.int32(0), jnp.int32(0)))
  n_sel = jnp.minimum(nv, k)
  need_eq = n_sel - g

  # -1 into the unused tail slots (disjoint from the slots the compaction writes).
  for j in range(kp // chunk):
    cols = j * chunk + iota
    pltriton.store(
      o_ref.at[r, pl.ds(j * chunk, chunk)], jnp.full((chunk,), -1, jnp.int32), mask=cols >= n_sel
    )

  def compact(c, carry):
    n_done, n_eq = carry
    key, valid = load(c)
    eq = (valid & (key == tau)).astype(jnp.int32)
    eq_rank = n_eq + jnp.cumsum(eq) - eq
    sel = (valid & (key > tau)) | ((eq == 1) & (eq_rank < need_eq))
    sel_i = sel.astype(jnp.int32)
    pos = n_done + jnp.cumsum(sel_i) - sel_i
    # Unselected lanes get distinct dummy slots past kp: the interpreter discharges a masked
    # scatter as a full scatter, so duplicate targets would race with real writes.
    pos = jnp.where(sel, pos, kp + iota)
    pltriton.store(o_ref.at[r, pos], c * chunk + iota, mask=sel)
    return n_done + jnp.sum(sel_i), n_eq + jnp.sum(eq)

  jax.lax.fori_loop(0, n_chunks, compact, (jnp.int32(0), jnp.int32(0)))


@functools.partial(jax.jit, static_argnames=("k", "block_sizes", "interpret"))
def select_topk(scores, lengths, *, k: int, block_sizes: BlockSizes, interpret=False):
  """scores [R, S] f32, lengths [R] int32 (columns >= length are ignored) -> idx [R, k] int32."""
  r, s = scores.shape
  chunk = block_sizes.chunk
  sp = -(-s // chunk) * chunk
  if sp != s:  # keeps every chunk load in bounds (the interpreter clamps out-of-range slices)
    scores = jnp.pad(scores, ((0, 0), (0, sp - s)), constant_values=-jnp.inf)
  kp = -(-k // chunk) * chunk
  kern = functools.partial(
    _select_kernel, k=k, kp=kp, chunk=chunk, radix_bits=block_sizes.radix_bits
  )
  out = pl.pallas_call(
    kern,
    out_shape=jax.ShapeDtypeStruct((r, kp + chunk), jnp.int32),
    grid=(r,),
    compiler_params=pltriton.CompilerParams(num_warps=block_sizes.num_warps, num_stages=1),
    interpret=interpret,
    name="radix_select_topk",
  )(jnp.minimum(lengths.astype(jnp.int32), s), scores.astype(jnp.float32))
  return out[:, :k]


def indexer_topk_blocked(
  q,
  k,
  w,
  *,
  topk: int,
  block_t: int,
  logits_block_sizes=None,
  select_block_sizes=None,
  interpret=False,
):
  """Causal indexer top-k [B,T,topk] int32: FP8 logits kernel + radix select per query block.

  Per block of block_t queries only keys up to the block's causal bound are scored, into a
  [B, block_t, S_blk] f32 buffer that the select kernel consumes with per-row lengths, so the
  [T,S] logits never exist at once (the logits tile still goes through HBM: not yet fused into
  one kernel). Slots are in ascending key order, -1 when a row has fewer than topk keys.
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

  from pallas_kernels.lightning_indexer import kernel as lik  # noqa: PLC0415

  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  lbs = logits_block_sizes or lik.BlockSizes.default_for(block_t, s)
  sbs = select_block_sizes or BlockSizes.default_for(s)
  q8, k8, wq, ks = lik.prepare_fp8(q, k, w)
  off = s - t
  outs = []
  for t0 in range(0, t, block_t):
    n = min(block_t, t - t0)
    s_blk = min(s, -(-(off + t0 + n) // lbs.block_k) * lbs.block_k)
    logits = lik.logits_fp8(
      q8[:, t0 : t0 + n],
      k8[:, :s_blk],
      wq[:, t0 : t0 + n],
      ks[:, :s_blk],
      block_sizes=lbs,
      causal=True,
      q_offset=off + t0,
      interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    lengths = jnp.tile(off + t0 + 1 + jnp.arange(n, dtype=jnp.int32), b)
    idx = select_topk(
      logits.reshape(b * n, s_blk), lengths, k=topk, block_sizes=sbs, interpret=interpret
    )
    outs.append(idx.reshape(b, n, topk))
  return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
