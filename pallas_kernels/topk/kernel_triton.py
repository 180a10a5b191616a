# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Exact per-row top-k as a threshold select (no sort), one Pallas-Triton program per row.

Scores are f32 rows (-inf or NaN = masked; only the first `length` columns are scanned). Each
score maps to an order-preserving uint32 key (sign-flip trick; like lax.top_k a total order,
-0.0 below +0.0); masked keys become 0, below every valid key. The row keeps min(k, #valid) keys:
every key > tau plus the first (in index order) keys == tau, tau being the exact k-th largest key,
so ties go to the lower index like lax.top_k. Output: [rows, k] int32 in ascending key-index
order (not score order), -1 in unused slots. Rows with length <= k skip the search.

The select (~3 streaming passes over the row):
  1. Strided sample of `sample` keys; their ranks (pairwise compare) give `thresholds - 1` sample
     quantiles around the k-th largest (spread over +-3 binomial sigma), plus threshold 1 (counts
     the valid keys).
  2. One counting pass: #keys >= each threshold, counted elementwise in a [thresholds, chunk]
     register accumulator and reduced once. This brackets tau in [lo, hi) with n_cand keys. If
     n_cand > cap (bad sample, heavy ties), further counting passes split [lo, hi) in key space
     and shrink it to the smallest and largest key inside, until it fits or holds one key value.
  3. Compaction pass: keys in [lo, hi) and their indices go to a per-row scratch (ascending index
     order), then a radix select over only those candidates finds tau (skipping the leading bits
     lo and hi - 1 share) and the index of the last tie to keep ("cut").
  4. Output pass: key > tau or (key == tau and index <= cut), scattered to its prefix-sum slot.
Pointer-style masked loads and vector-indexed stores; passes re-stream the row (from L2 mostly),
each chunk's load issued one chunk ahead (`prefetch`); the grid runs the last row first. On CPU
the kernel runs under interpret=True (`cap` + `chunk` extra scratch and output slots then catch
the dead lanes of the interpreter's unmasked scatters).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_U32_MAX = 0xFFFFFFFF
_I32_MAX = 2**31 - 1


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _pow2(n: int) -> bool:
  return n > 0 and not n & (n - 1)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Select-kernel knobs (all static).

  chunk: columns per vector step (power of 2). radix_bits: digit width of the radix search over
  the candidates (2 keeps the [2^bits, chunk] accumulator's registers down). num_warps,
  num_stages: Triton's. sample, thresholds, cap: sample size (power of 2 >= 16), counts per
  counting pass (power of 2 >= 4), candidate buffer per row. prefetch: load the next chunk of the
  row before working on the current one.
  """

  chunk: int = 512
  radix_bits: int = 2
  num_warps: int = 4
  sample: int = 256
  thresholds: int = 8
  cap: int = 2048
  prefetch: bool = True
  num_stages: int = 1

  def __post_init__(self):
    if not _pow2(self.chunk):
      raise ValueError(f"chunk={self.chunk} must be a power of 2")
    if self.radix_bits not in (1, 2, 4, 8):
      raise ValueError(f"radix_bits={self.radix_bits} must be one of 1, 2, 4, 8")
    if not _pow2(self.sample) or self.sample < 16:
      raise ValueError(f"sample={self.sample} must be a power of 2 >= 16")
    if not _pow2(self.thresholds) or not 4 <= self.thresholds <= 64:
      raise ValueError(f"thresholds={self.thresholds} must be a power of 2 in [4, 64]")
    if self.cap < 1:
      raise ValueError(f"cap={self.cap} must be positive")
    if self.num_stages < 1:
      raise ValueError(f"num_stages={self.num_stages} must be positive")

  @staticmethod
  def default_for(n_cols: int) -> "BlockSizes":
    return BlockSizes(chunk=min(512, max(16, pl.next_power_of_2(n_cols))))


def _keys(x):
  """f32 -> order-preserving uint32 key (larger float -> larger key); masked (-inf, NaN) -> 0.

  The smallest valid key (-max_float) is 0x00800000, so 0 sorts below every valid key.
  """
  b = jax.lax.bitcast_convert_type(x, jnp.uint32)
  key = jnp.where((b >> 31) == 1, ~b, b | jnp.uint32(0x80000000))
  return jnp.where(x > -jnp.inf, key, jnp.uint32(0))


def _row():
  # Last row first: in causal prefill the rows grow with the index, and longest-first leaves
  # no long row alone at the tail of the grid.
  return pl.num_programs(0) - 1 - pl.program_id(0)


def _row_stream(x_ref, r, length, chunk, prefetch):
  """stream(n, body, init): fori over the row's chunks 0..n-1 with body(c, key, cols, carry).

  prefetch: chunk c + 1's load is issued before chunk c's work and carried in registers. With
  num_stages=1 nothing else overlaps a chunk's load latency with work (a past-the-end load is
  fully masked: no memory access).
  """
  iota = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)

  def raw(c):
    cols = c * chunk + iota
    return pltriton.load(x_ref.at[r, pl.ds(c * chunk, chunk)], mask=cols < length, other=-jnp.inf)

  def stream(n, body, init):
    if not prefetch:
      return jax.lax.fori_loop(
        0, n, lambda c, carry: body(c, _keys(raw(c)), c * chunk + iota, carry), init
      )

    def step(c, st):
      x, carry = st
      nxt = raw(c + 1)
      return nxt, body(c, _keys(x), c * chunk + iota, carry)

    return jax.lax.fori_loop(0, n, step, (raw(0), init))[1]

  return stream


# Every jnp.where below gets typed scalars: the Triton lowering of select_n gives a weak-typed
# Python literal the predicate's type (i1).
def _sample_kernel(
  len_ref, x_ref, o_ref, ck_ref, ci_ref, *, k, kp, chunk, rb, ns, m, cap, capw, prefetch, pad
):
  u32, i32 = jnp.uint32, jnp.int32
  r = _row()
  length = len_ref[r]
  n_chunks = pl.cdiv(length, chunk)
  iota = jax.lax.broadcasted_iota(i32, (chunk,), 0)
  mi = jax.lax.broadcasted_iota(i32, (m,), 0)
  big = length > k
  stream = _row_stream(x_ref, r, length, chunk, prefetch)

  # 1. Strided sample; crank_i = #{j : key_j >= key_i}, so the r-th largest sample key is
  # max{key_i : crank_i >= r}. Counted in an elementwise [sb, ns] accumulator, the next block's
  # gather in flight during the current block's compares. Rows with length <= k skip it.
  sb = 16
  sidx = jax.lax.broadcasted_iota(i32, (ns,), 0)
  skey = _keys(
    pltriton.load(
      x_ref.at[r, (sidx * length) // ns], mask=jnp.broadcast_to(big, (ns,)), other=-jnp.inf
    )
  )
  jb = jax.lax.broadcasted_iota(i32, (sb,), 0)

  def gather(b):
    ok = (b * sb + jb < ns) & big
    return pltriton.load(x_ref.at[r, ((b * sb + jb) * length) // ns], mask=ok, other=-jnp.inf)

  def rank(b, st):
    x, acc = st
    nxt = gather(b + 1)
    return nxt, acc + (_keys(x)[:, None] >= skey[None, :]).astype(i32)

  n_sb = jnp.where(big, i32(ns // sb), i32(0))
  _, acc = jax.lax.fori_loop(0, n_sb, rank, (gather(0), jnp.zeros((sb, ns), i32)))
  crank = jnp.sum(acc, axis=0)
  # Sample rank of the k-th largest key and its binomial spread; thresholds 1..m-1 sit at
  # z = 3 u (|u| + 1) / (h (h + 1)) sigmas, u = -h..h (e.g. 0, +-0.5, +-1.5, +-3 for m = 8).
  rho = (k * ns) / jnp.maximum(length, 1).astype(jnp.float32)
  sig = jnp.sqrt(rho * jnp.maximum(1.0 - rho / ns, 0.0)) + 1.0
  h = m // 2 - 1
  u = (jax.lax.broadcasted_iota(i32, (m, 1), 0) - m // 2).astype(jnp.float32)
  z = 3.0 * u * (jnp.abs(u) + 1.0) / (h * (h + 1))
  tr = jnp.clip(jnp.floor(rho - z * sig + 0.5), 1.0, float(ns)).astype(i32)  # [m, 1]
  thr = jnp.max(jnp.where(crank[None, :] >= tr, skey[None, :], u32(0)), axis=1)
  thr = jnp.where(mi == 0, u32(1), jnp.maximum(thr, u32(1)))  # threshold 1 counts valid keys

  # 2. Counting passes. A bracket [lo, hi) with clo = #keys >= lo >= k > chi = #keys >= hi.
  def count(thr, trips):
    def body(c, key, cols, acc):
      return acc + (key[None, :] >= thr[:, None]).astype(i32)

    return jnp.sum(stream(trips, body, jnp.zeros((m, chunk), i32)), axis=1)

  def narrow(thr, cnt, st):  # counts are monotone in the threshold: no ordering needed
    lo, clo, hi, chi = st
    ge = cnt >= k
    return (
      jnp.maximum(lo, jnp.max(jnp.where(ge, thr, u32(0)))),
      jnp.minimum(clo, jnp.min(jnp.where(ge, cnt, i32(_I32_MAX)))),
      jnp.minimum(hi, jnp.min(jnp.where(ge, u32(_U32_MAX), thr))),
      jnp.maximum(chi, jnp.max(jnp.where(ge, i32(0), cnt))),
    )

  cnt = count(thr, jnp.where(big, n_chunks, i32(0)))
  nv = jnp.sum(jnp.where(mi == 0, cnt, i32(0)))
  take_all = nv <= k  # also every row with length <= k (nothing was counted)
  st = narrow(thr, cnt, (u32(0), length, u32(_U32_MAX), i32(0)))

  def too_wide(st):
    lo, clo, hi, chi = st
    return jnp.logical_not(take_all) & (clo - chi > cap) & (hi - lo > 1)

  def split(st):
    # Thresholds lo, lo + 1, lo + j (hi - lo) / m: the bracket shrinks every time. The same pass
    # takes the smallest and largest key in [lo, hi): no key lies between them and the bracket
    # ends, so the bracket can shrink to them too (a tie mass anywhere inside is isolated).
    lo, _, hi, _ = st
    ju = mi.astype(u32)
    step = (hi - lo) >> (m.bit_length() - 1)
    thr = lo + jnp.where(ju == 1, u32(1), jnp.maximum(ju, step * ju))

    def body(c, key, cols, carry):
      acc, mn, mx = carry
      inb = (key >= lo) & (key < hi)
      acc = acc + (key[None, :] >= thr[:, None]).astype(i32)
      mn = jnp.minimum(mn, jnp.where(inb, key, u32(_U32_MAX)))
      return acc, mn, jnp.maximum(mx, jnp.where(inb, key, u32(0)))

    acc, mn, mx = stream(
      n_chunks,
      body,
      (jnp.zeros((m, chunk), i32), jnp.full((chunk,), _U32_MAX, u32), jnp.zeros((chunk,), u32)),
    )
    lo2, clo2, hi2, chi2 = narrow(thr, jnp.sum(acc, axis=1), st)
    return jnp.maximum(lo2, jnp.min(mn)), clo2, jnp.minimum(hi2, jnp.max(mx) + 1), chi2

  lo, clo, hi, chi = jax.lax.while_loop(too_wide, split, st)
  n_cand = clo - chi
  kk = k - chi  # tau is the kk-th largest key in [lo, hi)
  use_s = jnp.logical_not(take_all) & (n_cand <= cap)

  # 3a. Candidates -> scratch, in ascending index order.
  def compact(c, key, cols, n):
    inb = (key >= lo) & (key < hi)
    ii = inb.astype(i32)
    pos = n + jnp.cumsum(ii) - ii
    if pad:  # interpreter: a masked scatter is a full scatter; give dead lanes distinct slots
      pos = jnp.where(inb, pos, capw + iota)
    pltriton.store(ck_ref.at[r, pos], key, mask=inb)
    pltriton.store(ci_ref.at[r, pos], cols, mask=inb)
    return n + jnp.sum(ii)

  stream(jnp.where(use_s, n_chunks, i32(0)), compact, i32(0))
  if not pad:  # the scratch is read back by other threads of this program
    pltriton.debug_barrier()

  nc = jnp.where(use_s, pl.cdiv(n_cand, chunk), i32(0))

  def cload(c):
    cols = c * chunk + iota
    ok = cols < n_cand
    return pltriton.load(ck_ref.at[r, pl.ds(c * chunk, chunk)], mask=ok, other=u32(0)), ok

  # 3b. Radix search over the candidates; the leading bits shared by lo and hi - 1 are fixed.
  lead = jax.lax.clz(jax.lax.bitcast_convert_type(lo ^ (hi - 1), i32))
  p0 = lead // rb
  keep = rb * p0
  s0 = jnp.minimum(32 - keep, 31).astype(u32)
  prefix0 = jnp.where(keep == 0, u32(0), (lo >> s0) << s0)
  nb = 1 << rb
  digits = jax.lax.broadcasted_iota(u32, (nb, 1), 0)

  def rpass(p, prefix):
    shift = (32 - rb * (p + 1)).astype(u32)
    cand = prefix | (digits << shift)

    def body(c, acc):
      return acc + (cload(c)[0][None, :] >= cand).astype(i32)

    cnt = jnp.sum(jax.lax.fori_loop(0, nc, body, jnp.zeros((nb, chunk), i32)), axis=1)
    d = jnp.maximum(jnp.sum((cnt >= kk).astype(i32)) - 1, 0).astype(u32)
    return prefix | (d << shift)

  tau_s = jax.lax.fori_loop(p0, jnp.where(use_s, i32(32 // rb), p0), rpass, prefix0)
  # No scratch (n_cand > cap) only happens with hi == lo + 1: every candidate equals lo.
  tau = jnp.where(take_all, u32(0), jnp.where(use_s, tau_s, lo))

  def gt(c, g):
    return g + jnp.sum((cload(c)[0] > tau).astype(i32))

  need = kk - jax.lax.fori_loop(0, nc, gt, i32(0))  # ties to keep, counted in index order

  def cut_step(key, idx, ok, carry):  # `cut`: index of the need-th key == tau
    n_eq, cut = carry
    eq = ok & (key == tau)
    e = eq.astype(i32)
    rk = n_eq + jnp.cumsum(e)
    cut = jnp.maximum(cut, jnp.max(jnp.where(eq & (rk == need), idx, i32(-1))))
    return n_eq + jnp.sum(e), cut

  def scut(c, carry):
    key, ok = cload(c)
    idx = pltriton.load(ci_ref.at[r, pl.ds(c * chunk, chunk)], mask=ok, other=-1)
    return cut_step(key, idx, ok, carry)

  _, cut = jax.lax.fori_loop(0, nc, scut, (i32(0), i32(-1)))
  n_row = jnp.where(jnp.logical_not(take_all | use_s), n_chunks, i32(0))
  _, cut = stream(
    n_row, lambda c, key, cols, carry: cut_step(key, cols, True, carry), (i32(0), cut)
  )

  # 4. Output: keys > tau, and ties up to index `cut` (take_all: tau = 0, cut = -1: every valid).
  def emit(c, key, cols, n):
    sel = (key > tau) | ((key == tau) & (cols <= cut))
    si = sel.astype(i32)
    pos = n + jnp.cumsum(si) - si
    if pad:
      pos = jnp.where(sel, pos, kp + iota)
    pltriton.store(o_ref.at[r, pos], cols, mask=sel)
    return n + jnp.sum(si)

  n_sel = stream(n_chunks, emit, i32(0))
  for j in range(kp // chunk):  # -1 into the unused tail slots (disjoint from the ones above)
    cols = j * chunk + iota
    pltriton.store(
      o_ref.at[r, pl.ds(j * chunk, chunk)],
      jnp.full((chunk,), -1, i32),
      mask=(cols >= n_sel) & (cols < k),
    )


@functools.partial(jax.jit, static_argnames=("k", "block_sizes", "interpret"))
def select_topk(scores, lengths, *, k: int, block_sizes: BlockSizes, interpret=False):
  """scores [R, S] f32, lengths [R] int32 (columns >= length are ignored) -> idx [R, k] int32."""
  r, s = scores.shape
  bs = block_sizes
  chunk = bs.chunk
  sp = -(-s // chunk) * chunk
  if sp != s:  # keeps every chunk load in bounds (the interpreter clamps out-of-range slices)
    scores = jnp.pad(scores, ((0, 0), (0, sp - s)), constant_values=-jnp.inf)
  kp = -(-k // chunk) * chunk
  pad = bool(interpret)  # dead-lane slots for the interpreter's unmasked scatters
  out_w = kp + (chunk if pad else 0)
  lengths = jnp.minimum(lengths.astype(jnp.int32), s)
  scores = scores.astype(jnp.float32)
  params = pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)
  out = jax.ShapeDtypeStruct((r, out_w), jnp.int32)
  capw = -(-bs.cap // chunk) * chunk
  scratch_w = capw + (chunk if pad else 0)
  kern = functools.partial(
    _sample_kernel,
    k=k,
    kp=kp,
    chunk=chunk,
    rb=bs.radix_bits,
    ns=bs.sample,
    m=bs.thresholds,
    cap=bs.cap,
    capw=capw,
    prefetch=bs.prefetch,
    pad=pad,
  )
  idx, _, _ = pl.pallas_call(
    kern,
    out_shape=(
      out,
      jax.ShapeDtypeStruct((r, scratch_w), jnp.uint32),
      jax.ShapeDtypeStruct((r, scratch_w), jnp.int32),
    ),
    grid=(r,),
    compiler_params=params,
    interpret=interpret,
    name="sample_select_topk",
  )(lengths, scores)
  return idx if out_w == k else idx[:, :k]


def bucket_widths(s: int, block_k: int, chunk: int, num_buckets: int) -> list[int]:
  """Key widths the blocked indexer compiles for: multiples of ~s / num_buckets (rounded up to
  block_k and the select chunk), capped at s; at most num_buckets distinct widths."""
  align = math.lcm(block_k, chunk)
  unit = _cdiv(_cdiv(s, num_buckets), align) * align
  return sorted({min(s, unit * j) for j in range(1, _cdiv(s, unit) + 1)})


@functools.partial(
  jax.jit,
  static_argnames=(
    "topk",
    "block_t",
    "logits_block_sizes",
    "select_block_sizes",
    "num_buckets",
    "interpret",
    "ratio",
  ),
)
def indexer_topk_blocked(
  q,
  k,
  w,
  *,
  topk: int,
  block_t: int,
  logits_block_sizes=None,
  select_block_sizes=None,
  num_buckets: int = 8,
  interpret=False,
  offset=None,
  ratio: int = 1,
):
  """Causal indexer top-k [B,T,topk] int32: FP8 logits kernel + select kernel per query block.

  Query blocks are bucketed by their causal key bound, rounded up to one of <= num_buckets widths
  (bucket_widths). The blocks of one bucket run under one lax.map: the logits kernel scores the
  block (sliced dynamically) against the bucket's keys with causal=False, into a [B, block_t, W]
  f32 buffer, and the causal bound goes to the select kernel as per-row lengths (dynamic). So at
  most num_buckets (+1 for a partial last block) kernel shapes are compiled whatever T is, and
  the [T,S] logits never exist at once (each block's logits tile goes through HBM between the
  two kernels). Keys past a row's bound are scored but ignored: up to S / num_buckets extra
  logits per row. Slots are in ascending key order, -1 when a row has fewer than topk keys.

  offset: global position of query 0 (default S - T: the queries are the last T keys). It may be
  traced (a context-parallel shard's start); then no key bound is static, so every block scores
  all S keys (one kernel shape) and only the select is limited by the rows' lengths.

  ratio: keys are compressed entries of `ratio` tokens (DeepSeek-V4 CSA, ratio 4): the query at
  position p sees keys j < (p + 1) // ratio, never a partial block, and offset defaults to 0
  (the queries are tokens 0..T-1). Only the rows' lengths and the buckets' key bounds change;
  ratio=1 is the token-level rule above. Any T and S: they are padded here to the logits kernel's
  block_q / block_k (padded keys lie past every row's length, padded queries are dropped).
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

  from pallas_kernels.lightning_indexer import kernel_mosaic_gpu as lik  # noqa: PLC0415

  if ratio < 1:
    raise ValueError(f"ratio={ratio} must be >= 1")
  b, t, s_keys = q.shape[0], q.shape[1], k.shape[1]
  lbs = logits_block_sizes or lik.BlockSizes.default_for(block_t, s_keys)
  t_run = _cdiv(t, lbs.block_q) * lbs.block_q  # no-ops for the shapes the V3.2 op admits
  s = _cdiv(s_keys, lbs.block_k) * lbs.block_k
  if t_run != t:
    q = jnp.pad(q, ((0, 0), (0, t_run - t), (0, 0), (0, 0)))
    w = jnp.pad(w, ((0, 0), (0, t_run - t), (0, 0)))
  if s != s_keys:
    k = jnp.pad(k, ((0, 0), (0, s - s_keys), (0, 0)))
  sbs = select_block_sizes or BlockSizes.default_for(s)
  q8, k8, wq, ks = lik.prepare_fp8(q, k, w)
  if offset is None:
    off = s_keys - t if ratio == 1 else 0
    widths = bucket_widths(s, lbs.block_k, sbs.chunk, num_buckets)
  else:
    off = jnp.asarray(offset, jnp.int32)
    widths = [s]
  lint = plgpu.InterpretGPUParams() if interpret else None

  def bound(end):  # keys visible to the query at position end - 1
    return end if ratio == 1 else end // ratio

  def width_for(need):
    if offset is not None:
      return widths[-1]
    return next(x for x in widths if x >= min(need, s))

  def one_block(t0, n, width):  # t0 may be traced; n and width are static
    logits = lik.logits_fp8(
      jax.lax.dynamic_slice_in_dim(q8, t0, n, axis=1),
      k8[:, :width],
      jax.lax.dynamic_slice_in_dim(wq, t0, n, axis=1),
      ks[:, :width],
      block_sizes=lbs,
      causal=False,
      q_offset=0,
      interpret=lint,
    )
    lengths = bound(off + t0 + 1 + jnp.arange(n, dtype=jnp.int32))
    if ratio != 1 or s != s_keys:  # never past the real keys (V3.2's bound is <= S already)
      lengths = jnp.minimum(lengths, s_keys)
    lengths = jnp.tile(lengths, b)
    idx = select_topk(
      logits.reshape(b * n, width), lengths, k=topk, block_sizes=sbs, interpret=interpret
    )
    return idx.reshape(b, n, topk)

  groups = {}  # width -> starts of its full blocks (consecutive: widths grow with t0)
  for t0 in range(0, t_run - t_run % block_t, block_t):
    groups.setdefault(width_for(bound(off + t0 + block_t)), []).append(t0)
  outs = []
  for width, starts in groups.items():
    res = jax.lax.map(
      lambda t0, width=width: one_block(t0, block_t, width), jnp.asarray(starts, jnp.int32)
    )
    outs.append(jnp.moveaxis(res, 0, 1).reshape(b, len(starts) * block_t, topk))
  if t_run % block_t:
    t0 = t_run - t_run % block_t
    outs.append(one_block(t0, t_run % block_t, width_for(s)))
  out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
  return out[:, :t] if t_run != t else out
