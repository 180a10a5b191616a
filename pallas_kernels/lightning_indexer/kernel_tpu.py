# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Pallas TPU (Mosaic) lightning-indexer logits: a tiled dense kernel with a numerics switch.

  I[b,t,s] = ks[b,s] · Σ_j wq[b,t,j] · ReLU(qx[b,t,j] · kx[b,s])      (f32, -inf for s > pos(t))

`numerics` picks the operand format of the one matmul (docs/architecture.md §Kernels):
  "fp8"  e4m3 with per-128-vector power-of-two scales: the definition (docs/dsa.md
         §Indexer), same quantiser as the GPU kernel. Fast only on v7 (2x bf16); v6e accepts it at
         the bf16 rate; v5e/v5p have no fp8 MXU.
  "int8" symmetric per-128-vector int8 (scale amax/127), int32 accumulate: 2x bf16 on v5e/v5p/v6e,
         absent on v7.
  "bf16" the float inputs cast to bf16 (no scales).
The q scale is folded into wq and the k scale applied per key after the head sum: both are
positive, so they commute with ReLU. `default_numerics()` picks by chip (fp8 on v7, else int8).

Grid (B, T/block_q, S/block_k). One step: z = q_tile[block_q·J, D] · k_tileᵀ (MXU, "NT"), then
ReLU, × wq (column), sum over the J heads of each query (VPU/XLU: the epilogue is 3 VPU ops per
MXU output element, which on TPU is not free), × ks (row), causal mask. Key blocks wholly above a
query block's diagonal are not computed (just -inf) and their index_map is clamped to the last
live block, so the pipeline does not fetch them either.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common
from pallas_kernels.lightning_indexer import kernel_mosaic_gpu as gpu_kernel

NUMERICS = ("fp8", "int8", "bf16")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_q queries (block_q·J MXU rows) x block_k keys (a multiple of 128 lanes)."""

  block_q: int = 8
  block_k: int = 512

  def __post_init__(self):
    if self.block_q <= 0 or self.block_q % 8:
      raise ValueError(f"block_q={self.block_q} must be a positive multiple of 8")
    if self.block_k <= 0 or self.block_k % 128:
      raise ValueError(f"block_k={self.block_k} must be a positive multiple of 128")

  @staticmethod
  def default_for(t: int, s: int) -> "BlockSizes":
    bq = max(c for c in (8, 16, 32) if t % c == 0) if t % 8 == 0 else 8
    bk = max(c for c in (128, 256, 512) if s % c == 0) if s % 128 == 0 else 128
    return BlockSizes(block_q=bq, block_k=bk)


def default_numerics(device_kind: str | None = None) -> str:
  """fp8 on v7 and later (and off-TPU: the definition); int8 on v5e/v5p/v6e, where it is 2x bf16
  (docs/architecture.md §Kernels) and its top-k agrees with the FP8 selection as well as bf16's
  does (measured by the RECALL_TPU bench suite)."""
  kind = (device_kind or jax.devices()[0].device_kind).lower()
  if "tpu" not in kind:
    return "fp8"
  if "v5" in kind or "v6" in kind or "v4" in kind:
    return "int8"
  return "fp8"


def quantize_int8(x, axis=-1):
  """Symmetric per-vector int8: (x8 int8, scale f32 with `axis` dropped), x ≈ x8 · scale."""
  xf = x.astype(jnp.float32)
  amax = jnp.maximum(jnp.max(jnp.abs(xf), axis=axis, keepdims=True), 1e-4)
  scale = amax / 127.0
  x8 = jnp.clip(jnp.round(xf / scale), -127, 127).astype(jnp.int8)
  return x8, jnp.squeeze(scale, axis)


def prepare(q, k, w, numerics: str):
  """q [B,T,J,D], k [B,S,D], w [B,T,J] -> (qx, kx, wq f32 [B,T,J], ks f32 [B,S])."""
  if numerics == "fp8":
    return gpu_kernel.prepare_fp8(q, k, w)
  if numerics == "int8":
    q8, qs = quantize_int8(q)
    k8, ks = quantize_int8(k)
    return q8, k8, w.astype(jnp.float32) * qs, ks
  if numerics == "bf16":
    ks = jnp.ones(k.shape[:2], jnp.float32)
    return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), w.astype(jnp.float32), ks
  raise ValueError(f"numerics={numerics!r}; expected one of {NUMERICS}")


def _last_key(qpos, m):
  """The last key a query at position qpos sees: qpos (causal, m = 1), or the last whole block
  of ratio m before it (entry j visible iff j < (qpos + 1) // m; DeepSeek-V4's compressed keys)."""
  return qpos if m == 1 else jax.lax.div(qpos + 1, m) - 1  # qpos + 1 >= 1: div is floor


def _logits_kernel(q_ref, k_ref, w_ref, ks_ref, o_ref, *, j, bq, bk, off, causal, m):
  qi, ki = pl.program_id(1), pl.program_id(2)
  q0 = qi * bq
  live = (ki * bk <= _last_key(off + q0 + bq - 1, m)) if causal else True

  @pl.when(live)
  def _():
    qx, kx = q_ref[0], k_ref[0]  # [bq·J, D], [bk, D]
    acc_t = jnp.int32 if qx.dtype == jnp.int8 else jnp.float32
    z = jax.lax.dot_general(qx, kx, (((1,), (1,)), ((), ())), preferred_element_type=acc_t)
    r = jnp.maximum(z.astype(jnp.float32), 0.0) * w_ref[0]  # w column [bq·J, 1]
    v = jnp.sum(r.reshape(bq, j, bk), axis=1) * ks_ref[0]  # [bq, bk] · ks row [1, bk]
    if causal:
      kpos = ki * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
      qpos = off + q0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
      v = jnp.where(kpos <= _last_key(qpos, m), v, -jnp.inf)
    o_ref[0] = v

  if causal:

    @pl.when(jnp.logical_not(live))
    def _():
      o_ref[0] = jnp.full((bq, bk), -jnp.inf, jnp.float32)


def logits_call(
  qx, kx, wq, ks, *, block_sizes: BlockSizes, causal=True, q_offset=None, interpret=False, ratio=1
):
  """Prepared operands (see `prepare`) -> logits [B,T,S] f32. Query t sits at position
  q_offset + t (default S - T; 0 with ratio > 1) and sees keys up to `_last_key` of it."""
  b, t, j, d = qx.shape
  s = kx.shape[1]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  if t % bq or s % bk:
    raise ValueError(f"T={t} % block_q={bq} and S={s} % block_k={bk} must be 0")
  if j % 8:
    raise ValueError(f"J={j} indexer heads must be a multiple of 8")
  off = (s - t if ratio == 1 else 0) if q_offset is None else q_offset

  def live_k(qi, ki):  # dead blocks re-use the last live block's index: no new DMA
    last = jnp.maximum(_last_key(off + qi * bq + bq - 1, ratio), 0)
    return jnp.minimum(ki, jax.lax.div(last, bk)) if causal else ki

  k_map = lambda bi, qi, ki: (bi, live_k(qi, ki), 0)
  ks_map = lambda bi, qi, ki: (bi, 0, live_k(qi, ki))

  kern = functools.partial(_logits_kernel, j=j, bq=bq, bk=bk, off=off, causal=causal, m=ratio)
  flops = 2 * b * t * j * d * s // (2 if causal else 1)
  return pl.pallas_call(
    kern,
    grid=(b, t // bq, s // bk),
    in_specs=[
      pl.BlockSpec((1, bq * j, d), lambda bi, qi, ki: (bi, qi, 0)),
      pl.BlockSpec((1, bk, d), k_map),
      pl.BlockSpec((1, bq * j, 1), lambda bi, qi, ki: (bi, qi, 0)),
      pl.BlockSpec((1, 1, bk), ks_map),
    ],
    out_specs=pl.BlockSpec((1, bq, bk), lambda bi, qi, ki: (bi, qi, ki)),
    out_shape=jax.ShapeDtypeStruct((b, t, s), jnp.float32),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    cost_estimate=pl.CostEstimate(
      flops=flops, transcendentals=0, bytes_accessed=4 * b * t * s + qx.size + kx.size * (t // bq)
    ),
    interpret=interpret,
    name=f"indexer_logits_tpu_{qx.dtype.name}",
  )(
    qx.reshape(b, t * j, d),
    kx,
    wq.astype(jnp.float32).reshape(b, t * j, 1),
    ks.astype(jnp.float32).reshape(b, 1, s),
  )


@functools.partial(
  jax.jit, static_argnames=("numerics", "block_sizes", "causal", "q_offset", "interpret")
)
def indexer_logits_tpu(
  q, k, w, *, numerics="fp8", block_sizes=None, causal=True, q_offset=None, interpret=False
):
  """Float q [B,T,J,D], k [B,S,D], w [B,T,J] -> I [B,T,S] f32 with the chosen matmul numerics."""
  bs = block_sizes or BlockSizes.default_for(q.shape[1], k.shape[1])
  return logits_call(
    *prepare(q, k, w, numerics),
    block_sizes=bs,
    causal=causal,
    q_offset=q_offset,
    interpret=interpret,
  )


def emulate_logits(q, k, w, numerics: str, *, causal=True):
  """The kernel's arithmetic in plain XLA (same quantisers, f32/int32 accumulate): what the recall
  study runs at sizes the interpreter cannot. Validated against the kernel in the tests."""
  qx, kx, wq, ks = prepare(q, k, w, numerics)
  acc_t = jnp.int32 if numerics == "int8" else jnp.float32
  z = jnp.einsum("btjd,bsd->btjs", qx, kx, preferred_element_type=acc_t).astype(jnp.float32)
  i = jnp.einsum("btj,btjs->bts", wq, jnp.maximum(z, 0.0)) * ks[:, None, :]
  if causal:
    t, s = q.shape[1], k.shape[1]
    vis = jnp.arange(s)[None, :] <= (s - t + jnp.arange(t))[:, None]
    i = jnp.where(vis[None], i, -jnp.inf)
  return i


# Under jit so that a remat replay which does not need the ids (they are kept) drops the whole
# selection: a bare pallas_call is never removed from a jaxpr.
@functools.partial(
  jax.jit,
  static_argnames=(
    "topk",
    "block_t",
    "numerics",
    "recall_target",
    "block_sizes",
    "interpret",
    "ratio",
  ),
)
def indexer_topk_tpu(
  q,
  k,
  w,
  *,
  topk: int,
  block_t: int,
  numerics="fp8",
  recall_target=None,
  block_sizes=None,
  interpret=False,
  ratio=1,
):
  """Causal indexer top-k [B,T,topk] int32 (-1 = no key): per block of block_t queries, the logits
  kernel over the keys up to the block's causal bound, then the TPU top-k (topk/kernel_tpu.py:
  exact lax.top_k, or approx_max_k with `recall_target`). [T,S] is never held at once.
  ratio m > 1: k holds compressed entries and query t (tokens 0..T-1) sees entries
  j < (t+1)//m (DeepSeek-V4); T and S are then padded to the blocks inside (padding is never
  visible), while ratio 1 keeps its callers' tile-aligned shapes."""
  from pallas_kernels.topk import kernel_tpu as topk_tpu  # noqa: PLC0415

  t, s = q.shape[1], k.shape[1]
  qx, kx, wq, ks = prepare(q, k, w, numerics)
  off = s - t if ratio == 1 else 0
  outs = []
  for t0 in range(0, t, block_t):
    n = min(block_t, t - t0)
    bs = block_sizes or BlockSizes.default_for(n, s)
    bq, bk = bs.block_q, bs.block_k
    seen = off + t0 + n if ratio == 1 else max((t0 + n) // ratio, 1)  # keys the block's rows see
    s_blk = -(-seen // bk) * bk
    if ratio == 1:
      s_blk = min(s, s_blk)
    q_blk, w_blk = qx[:, t0 : t0 + n], wq[:, t0 : t0 + n]
    k_blk, ks_blk = kx[:, :s_blk], ks[:, :s_blk]
    if ratio != 1:  # zero rows past T and U: padded queries are sliced off, padded keys unseen
      q_blk, w_blk = (_common.pad_axis(x, 1, bq) for x in (q_blk, w_blk))
      k_blk, ks_blk = (_common.pad_axis(x, 1, bk) for x in (k_blk, ks_blk))
    logits = logits_call(
      q_blk,
      k_blk,
      w_blk,
      ks_blk,
      block_sizes=bs,
      causal=True,
      q_offset=off + t0,
      interpret=interpret,
      ratio=ratio,
    )
    outs.append(topk_tpu.topk_tpu(logits[:, :n], topk, recall_target=recall_target))
  return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
