# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Warm-up dense indexer KL as Pallas-Triton GPU kernels (docs/dsa.md §Training; math in grad.py).

Tiles are [bt queries, bs keys]; a query block's program walks its causal key blocks (queries are
the last T of S keys, query t at position S - T + t; or, with ratio m > 1, DeepSeek-V4's
block-causal rule over compressed entries: query t at position t sees entries j < (t+1)//m),
nothing [T,S]-sized is ever held:
  I  = Σ_j w[:,j] · ReLU(q_j · kᵀ)          fori over the J indexer heads, a [bt,D]·[D,bs] dot each
  pt = Σ_h exp(scale · aq_h · kv_hᵀ - lse_h)  fori over the H attention heads, C in chunks of bc
kernels:
  lse  (only when attn_lse is None): grid (query block, batch, head); online max/sum over the
       key blocks -> the attention's per-head lse [B,H,T].
  fwd  grid (query block, batch): online over key blocks, per row: the indexer lse (m, l),
       ps = Σ pt, a = Σ pt log pt and c = Σ pt (I - m) (rescaled when m moves), so
       KL = a/ps - log ps - c/ps + log l. Returns kl, lse_I, ps.
  dq   grid (query block, batch): per key block rebuild I, P = exp(I - lse_I), pt and
       g = (P·[ps>0] - pt/ps)·dl, then a second head loop: z_j again, dw[:,j] += Σ_s g ReLU(z_j),
       dq[:,j] += (g·w_j·1[z_j>0]) · k. dq [bt,J,D] f32 does not fit in registers (2 MiB at
       bt=64, J=64, D=128): it accumulates in the output rows the program owns (read-modify-write
       per key block, a barrier between key blocks; no atomics, no other writer).
  dk   grid (key block, batch): over the query blocks that see the key block, the same g,
       dk += (g·w_j·1[z_j>0])ᵀ · q_j in a [bs,D] f32 register accumulator.
With GRAD_IN_FORWARD, under differentiation with causal keys (ratio 1): every head's
probabilities sum to 1 over the row's keys, so ps = H is known before any sweep; an indexer-only
lse kernel (no target) gives lse_I, and the dq kernel with dl = 1 also sums the KL value and
adds each key block's dk tile to an f32 buffer by atomic adds (dense_kl_fwd_grad). The backward
scales dq, dw by each row's dl; dk holds as is for a dl equal on every row (a mean loss), else
the dk kernel runs. The target is rebuilt once per step instead of three times.
Dots take the inputs' dtype (bf16 on the tensor cores, f32 -> IEEE) with f32 accumulation; the
g-weighted operands are cast to the other operand's dtype (as flash attention casts P).
The wrapper pads T, S to the tiles, D to a power of 2 (>= 16) and C to a multiple of the C chunk
with zeros (no effect on any dot; padded rows get dl = 0), so every load is in bounds; Triton
needs power-of-2 tiles. On CPU the same kernels run under interpret=True.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common

MAX_DIM = 256  # largest (padded) indexer head dim the register tiles take
MAX_UNROLL = 4  # attention-dim chunks unrolled per head (more: a loop)
# Causal differentiation through dense_kl_fwd_grad (one target sweep with dq, dw and dk) instead
# of dense_kl_fwd + the dq and dk kernels (three); off: the three-sweep path (M1_DENSE_KL).
GRAD_IN_FORWARD = True
_NEG = -1e30


def _pow2(n: int) -> bool:
  return n > 0 and not n & (n - 1)


def _cdiv(a, b):
  return -(-a // b)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_t queries x block_s keys per tile, block_c: attention dim chunk per dot (all powers of
  2 >= 16). num_warps / num_stages: Triton's, for the lse and forward kernels; num_warps_bwd /
  num_stages_bwd for the dq and dk kernels (they hold I, pt, g and z tiles at once: with 4 warps
  they spill at 64x64 tiles)."""

  block_t: int = 64
  block_s: int = 128
  block_c: int = 64
  num_warps: int = 4
  num_warps_bwd: int = 8
  num_stages: int = 2
  num_stages_bwd: int = 2

  def __post_init__(self):
    for name in ("block_t", "block_s", "block_c"):
      v = getattr(self, name)
      if not _pow2(v) or v < 16:
        raise ValueError(f"{name}={v} must be a power of 2 >= 16")


def supported(q, attn_q) -> str | None:
  """None when the kernels take these shapes, else why not."""
  d = q.shape[-1]
  if max(16, pl.next_power_of_2(d)) > MAX_DIM:
    return f"indexer head dim D={d} > {MAX_DIM}"
  for name, x in (("q", q), ("attn_q", attn_q)):
    if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize > 4:
      return f"{name} dtype {x.dtype} (need f32, bf16 or f16)"
  return None


# ---------------------------------------------------------------------------------------------
# tile helpers (shared by all kernels)
# ---------------------------------------------------------------------------------------------


def _dot(a, b, ca, cb):
  """a·b contracting a's axis ca with b's axis cb, f32 accumulation (2-D operands)."""
  return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=jnp.float32)


def _vis(t0, s0, *, bt, bs, off, s, m=1):
  """[bt, bs] True where key s0 + c is a real key visible to query t0 + r: causal (m = 1), or
  block-causal over entries of ratio m (entry j visible iff j < (position + 1) // m)."""
  qpos = off + t0 + jax.lax.broadcasted_iota(jnp.int32, (bt, bs), 0)
  kpos = s0 + jax.lax.broadcasted_iota(jnp.int32, (bt, bs), 1)
  last = qpos if m == 1 else (qpos + 1) // m - 1
  return (kpos <= last) & (kpos < s)


def _indexer_tile(q_ref, w_ref, kt, b, t0, *, bt, nj):
  """I [bt, bs] f32 = Σ_j w[:,j] · ReLU(q_j · ktᵀ)."""

  def body(j, acc):
    z = _dot(q_ref[b, pl.ds(t0, bt), j, :], kt, 1, 1)
    wj = w_ref[b, j, pl.ds(t0, bt)].astype(jnp.float32)
    return acc + wj[:, None] * jnp.maximum(z, jnp.float32(0))

  return jax.lax.fori_loop(0, nj, body, jnp.zeros((bt, kt.shape[0]), jnp.float32))


def _attn_logits(aq_ref, kv_ref, b, h, t0, s0, *, bt, bs, nc, bc, mha):
  """Unscaled attention logits of head h, [bt, bs] f32, C in nc chunks of bc (unrolled up to
  MAX_UNROLL chunks, else a loop: 9 unrolled 64-chunks of the 576 absorbed row overflow SMEM)."""

  def chunk(c, acc):
    a = aq_ref[b, pl.ds(t0, bt), h, pl.ds(c * bc, bc)]
    if mha:
      kv = kv_ref[b, pl.ds(s0, bs), h, pl.ds(c * bc, bc)]
    else:
      kv = kv_ref[b, pl.ds(s0, bs), pl.ds(c * bc, bc)]
    return acc + _dot(a, kv, 1, 1)

  acc = jnp.zeros((bt, bs), jnp.float32)
  if nc > MAX_UNROLL:
    return jax.lax.fori_loop(0, nc, chunk, acc)
  for c in range(nc):
    acc = chunk(c, acc)
  return acc


def _target_tile(aq_ref, kv_ref, lse_ref, b, t0, s0, *, bt, bs, nh, nc, bc, mha, scale):
  """Unnormalised head-summed target pt [bt, bs] = Σ_h exp(scale·logits_h - lse_h) (unmasked)."""

  def body(h, acc):
    lg = _attn_logits(aq_ref, kv_ref, b, h, t0, s0, bt=bt, bs=bs, nc=nc, bc=bc, mha=mha)
    return acc + _common.exp_rows(lg, scale, lse_ref[b, h, pl.ds(t0, bt)])

  return jax.lax.fori_loop(0, nh, body, jnp.zeros((bt, bs), jnp.float32))


def _n_key_blocks(t0, *, bt, bs, off, s, m=1):
  """Key blocks a query block starting at t0 sees (its last row's bound, capped at S)."""
  return (jnp.minimum((off + t0 + bt) // m, s) + bs - 1) // bs


def _grad_tile(q_ref, w_ref, aq_ref, kv_ref, alse_ref, lsei, psn, psum, dl, kt, b, t0, s0, c):
  """g [bt, bs] = (P·[ps>0] - pt/ps)·dl over the visible keys, 0 elsewhere."""
  return _grad_tiles(q_ref, w_ref, aq_ref, kv_ref, alse_ref, lsei, psn, psum, dl, kt, b, t0, s0, c)[
    0
  ]


def _grad_tiles(q_ref, w_ref, aq_ref, kv_ref, alse_ref, lsei, psn, psum, dl, kt, b, t0, s0, c):
  """(g, I, pt, visible): _grad_tile's g and the tiles it came from."""
  bt, bs = c["bt"], c["bs"]
  vis = _vis(t0, s0, bt=bt, bs=bs, off=c["off"], s=c["s"], m=c["m"])
  i = _indexer_tile(q_ref, w_ref, kt, b, t0, bt=bt, nj=c["nj"])
  pt = _target_tile(
    aq_ref,
    kv_ref,
    alse_ref,
    b,
    t0,
    s0,
    bt=bt,
    bs=bs,
    nh=c["nh"],
    nc=c["nc"],
    bc=c["bc"],
    mha=c["mha"],
    scale=c["scale"],
  )
  p = _common.exp_rows(i, 1.0, lsei)
  g = (p * psum[:, None] - pt / psn[:, None]) * dl[:, None]
  return jnp.where(vis, g, jnp.float32(0)), i, pt, vis


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


def _lse_kernel(aq_ref, kv_ref, o_ref, *, c):
  bt, bs = c["bt"], c["bs"]
  i = pl.num_programs(0) - 1 - pl.program_id(0)
  b, h = pl.program_id(1), pl.program_id(2)
  t0 = i * bt
  nk = _n_key_blocks(t0, bt=bt, bs=bs, off=c["off"], s=c["s"], m=c["m"])

  def body(kb, carry):
    m, l = carry
    s0 = kb * bs
    lg = _attn_logits(
      aq_ref, kv_ref, b, h, t0, s0, bt=bt, bs=bs, nc=c["nc"], bc=c["bc"], mha=c["mha"]
    )
    lg = jnp.where(
      _vis(t0, s0, bt=bt, bs=bs, off=c["off"], s=c["s"], m=c["m"]),
      lg * jnp.float32(c["scale"]),
      _NEG,
    )
    m_new = jnp.maximum(m, jnp.max(lg, axis=1))
    l = l * _common.exp(m - m_new) + jnp.sum(_common.exp(lg - m_new[:, None]), axis=1)
    return m_new, l

  init = (jnp.full((bt,), _NEG, jnp.float32), jnp.zeros((bt,), jnp.float32))
  m, l = jax.lax.fori_loop(0, nk, body, init)
  o_ref[b, h, pl.ds(t0, bt)] = m + _common.log(l)


def _lsei_kernel(q_ref, k_ref, w_ref, o_ref, *, c):
  """The indexer logits' lse per row [B,Tp] over the visible keys (no target: a quarter of the
  forward's work at V3.2's shapes)."""
  bt, bs = c["bt"], c["bs"]
  i = pl.num_programs(0) - 1 - pl.program_id(0)
  b = pl.program_id(1)
  t0 = i * bt
  nk = _n_key_blocks(t0, bt=bt, bs=bs, off=c["off"], s=c["s"], m=c["m"])

  def body(kb, carry):
    m, l = carry
    s0 = kb * bs
    vis = _vis(t0, s0, bt=bt, bs=bs, off=c["off"], s=c["s"], m=c["m"])
    ind = _indexer_tile(q_ref, w_ref, k_ref[b, pl.ds(s0, bs), :], b, t0, bt=bt, nj=c["nj"])
    ind = jnp.where(vis, ind, _NEG)
    m_new = jnp.maximum(m, jnp.max(ind, axis=1))
    e = jnp.where(vis, _common.exp(ind - m_new[:, None]), jnp.float32(0))
    return m_new, l * _common.exp(m - m_new) + jnp.sum(e, axis=1)

  init = (jnp.full((bt,), _NEG, jnp.float32), jnp.zeros((bt,), jnp.float32))
  m, l = jax.lax.fori_loop(0, nk, body, init)
  o_ref[b, pl.ds(t0, bt)] = m + _common.log(l)


def _fwd_kernel(q_ref, k_ref, w_ref, aq_ref, kv_ref, alse_ref, kl_ref, lsei_ref, ps_ref, *, c):
  bt, bs = c["bt"], c["bs"]
  i = pl.num_programs(0) - 1 - pl.program_id(0)
  b = pl.program_id(1)
  t0 = i * bt
  nk = _n_key_blocks(t0, bt=bt, bs=bs, off=c["off"], s=c["s"], m=c["m"])
  zero = jnp.float32(0)

  def body(kb, carry):
    m, l, ps, a, cc = carry
    s0 = kb * bs
    vis = _vis(t0, s0, bt=bt, bs=bs, off=c["off"], s=c["s"], m=c["m"])
    kt = k_ref[b, pl.ds(s0, bs), :]
    ind = _indexer_tile(q_ref, w_ref, kt, b, t0, bt=bt, nj=c["nj"])
    pt = _target_tile(
      aq_ref,
      kv_ref,
      alse_ref,
      b,
      t0,
      s0,
      bt=bt,
      bs=bs,
      nh=c["nh"],
      nc=c["nc"],
      bc=c["bc"],
      mha=c["mha"],
      scale=c["scale"],
    )
    ind = jnp.where(vis, ind, _NEG)
    pt = jnp.where(vis, pt, zero)
    m_new = jnp.maximum(m, jnp.max(ind, axis=1))
    e = jnp.where(vis, _common.exp(ind - m_new[:, None]), zero)
    l = l * _common.exp(m - m_new) + jnp.sum(e, axis=1)
    pos = pt > zero
    cc = cc - (m_new - m) * ps + jnp.sum(jnp.where(pos, pt * (ind - m_new[:, None]), zero), axis=1)
    a = a + jnp.sum(
      jnp.where(pos, pt * _common.log(jnp.where(pos, pt, jnp.float32(1))), zero), axis=1
    )
    return m_new, l, ps + jnp.sum(pt, axis=1), a, cc

  z = jnp.zeros((bt,), jnp.float32)
  m, l, ps, a, cc = jax.lax.fori_loop(0, nk, body, (jnp.full((bt,), _NEG, jnp.float32), z, z, z, z))
  psn = jnp.maximum(ps, jnp.float32(1e-30))
  kl = a / psn - _common.log(psn) - cc / psn + _common.log(l)
  kl_ref[b, pl.ds(t0, bt)] = jnp.where(ps > zero, kl, zero)
  lsei_ref[b, pl.ds(t0, bt)] = m + _common.log(l)
  ps_ref[b, pl.ds(t0, bt)] = ps


def _row_stats(lsei_ref, ps_ref, dl_ref, b, t0, bt):
  lsei = lsei_ref[b, pl.ds(t0, bt)]
  ps = ps_ref[b, pl.ds(t0, bt)]
  psn = jnp.maximum(ps, jnp.float32(1e-30))
  return lsei, psn, ps / psn, dl_ref[b, pl.ds(t0, bt)]


def _dq_kernel(q_ref, k_ref, w_ref, aq_ref, kv_ref, alse_ref, lsei_ref, ps_ref, dl_ref, *refs, c):
  """dq, dw (and, with c["fused_dk"], the dk tile of each key block, atomically added to the
  zeroed dk buffer aliased in: no second rebuild by the dk kernel); with the KL output, the value."""
  if c.get("fused_dk"):
    _, dq_ref, dw_ref, dk_ref, *kl = refs
  else:
    dq_ref, dw_ref, *kl = refs
    dk_ref = None
  bt, bs, nj = c["bt"], c["bs"], c["nj"]
  i = pl.num_programs(0) - 1 - pl.program_id(0)
  b = pl.program_id(1)
  t0 = i * bt
  nk = _n_key_blocks(t0, bt=bt, bs=bs, off=c["off"], s=c["s"], m=c["m"])
  lsei, psn, psum, dl = _row_stats(lsei_ref, ps_ref, dl_ref, b, t0, bt)
  dp = q_ref.shape[-1]

  def zero_rows(j, carry):
    dq_ref[b, pl.ds(t0, bt), j, :] = jnp.zeros((bt, dp), jnp.float32)
    dw_ref[b, j, pl.ds(t0, bt)] = jnp.zeros((bt,), jnp.float32)
    return carry

  jax.lax.fori_loop(0, nj, zero_rows, 0)

  def body(kb, carry):
    s0 = kb * bs
    kt = k_ref[b, pl.ds(s0, bs), :]
    g, ind, pt, vis = _grad_tiles(
      q_ref, w_ref, aq_ref, kv_ref, alse_ref, lsei, psn, psum, dl, kt, b, t0, s0, c
    )
    if kl:  # Σ pt log pt and Σ pt (I - lse_I) over the visible keys (KL = a/ps - log ps - cc/ps)
      a, cc = carry
      pos = vis & (pt > jnp.float32(0))
      lpt = _common.log(jnp.where(pos, pt, jnp.float32(1)))
      a = a + jnp.sum(jnp.where(pos, pt * lpt, jnp.float32(0)), axis=1)
      cc = cc + jnp.sum(jnp.where(pos, pt * (ind - lsei[:, None]), jnp.float32(0)), axis=1)
      carry = (a, cc)

    def head(j, dk):
      qj = q_ref[b, pl.ds(t0, bt), j, :]
      z = _dot(qj, kt, 1, 1)
      wj = w_ref[b, j, pl.ds(t0, bt)].astype(jnp.float32)
      dw_ref[b, j, pl.ds(t0, bt)] += jnp.sum(g * jnp.maximum(z, jnp.float32(0)), axis=1)
      gz = jnp.where(z > jnp.float32(0), g * wj[:, None], jnp.float32(0))
      dq_ref[b, pl.ds(t0, bt), j, :] += _dot(gz.astype(kt.dtype), kt, 1, 0)
      if dk_ref is None:
        return dk
      return dk + _dot(gz.astype(qj.dtype), qj, 0, 0)

    dk0 = jnp.zeros((bs, dp), jnp.float32) if dk_ref is not None else 0
    dk = jax.lax.fori_loop(0, nj, head, dk0)
    if dk_ref is not None:  # other query blocks add to the same rows: atomics
      pltriton.atomic_add(dk_ref, (b, pl.ds(s0, bs), slice(None)), dk)
    if c["barrier"]:  # the next key block re-reads these rows, maybe from other threads
      pltriton.debug_barrier()
    return carry

  z = jnp.zeros((bt,), jnp.float32)
  a, cc = jax.lax.fori_loop(0, nk, body, (z, z))
  if kl:
    ps = ps_ref[b, pl.ds(t0, bt)]
    val = a / psn - _common.log(psn) - cc / psn
    kl[0][b, pl.ds(t0, bt)] = jnp.where(ps > jnp.float32(0), val, jnp.float32(0))


def _dk_kernel(
  q_ref, k_ref, w_ref, aq_ref, kv_ref, alse_ref, lsei_ref, ps_ref, dl_ref, dk_ref, *, c
):
  bt, bs, nj = c["bt"], c["bs"], c["nj"]
  kb = pl.program_id(0)
  b = pl.program_id(1)
  s0 = kb * bs
  kt = k_ref[b, pl.ds(s0, bs), :]
  # first query block with a row that sees key s0 (row t sits at off + t and sees keys up to
  # (off + t + 1) // m - 1, i.e. from off + t >= m·(s0 + 1) - 1)
  i0 = jnp.maximum(c["m"] * (s0 + 1) - 1 - c["off"], 0) // bt

  def body(i, dk):
    t0 = i * bt
    lsei, psn, psum, dl = _row_stats(lsei_ref, ps_ref, dl_ref, b, t0, bt)
    g = _grad_tile(q_ref, w_ref, aq_ref, kv_ref, alse_ref, lsei, psn, psum, dl, kt, b, t0, s0, c)

    def head(j, dk):
      qj = q_ref[b, pl.ds(t0, bt), j, :]
      z = _dot(qj, kt, 1, 1)
      wj = w_ref[b, j, pl.ds(t0, bt)].astype(jnp.float32)
      gz = jnp.where(z > jnp.float32(0), g * wj[:, None], jnp.float32(0))
      return dk + _dot(gz.astype(qj.dtype), qj, 0, 0)

    return jax.lax.fori_loop(0, nj, head, dk)

  dk = jax.lax.fori_loop(i0, c["nq"], body, jnp.zeros((bs, k_ref.shape[-1]), jnp.float32))
  dk_ref[b, pl.ds(s0, bs), :] = dk


# ---------------------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------------------


def _prepare(q, k, w, attn_q, attn_kv, attn_lse, bsz: BlockSizes, ratio: int = 1):
  """Padded, kernel-layout operands and the static config."""
  b, t, nj, d = q.shape
  s = k.shape[1]
  nh, cdim = attn_q.shape[2], attn_q.shape[3]
  bt, bs = bsz.block_t, bsz.block_s
  bc = min(bsz.block_c, max(16, pl.next_power_of_2(cdim)))
  dp = max(16, pl.next_power_of_2(d))
  pad_d = lambda x: _common.pad_axis(x, x.ndim - 1, dp)
  pad_c = lambda x: _common.pad_axis(x, x.ndim - 1, bc)
  qp = _common.pad_axis(pad_d(q), 1, bt)
  kp = _common.pad_axis(pad_d(k), 1, bs)
  wp = jnp.swapaxes(_common.pad_axis(w, 1, bt), 1, 2)  # [B, J, Tp]
  aq = _common.pad_axis(pad_c(attn_q), 1, bt)
  kv = _common.pad_axis(pad_c(attn_kv), 1, bs)
  alse = None
  if attn_lse is not None:
    alse = jnp.swapaxes(_common.pad_axis(attn_lse.astype(jnp.float32), 1, bt), 1, 2)  # [B,H,Tp]
  cfg = dict(
    bt=bt,
    bs=bs,
    bc=bc,
    nc=aq.shape[-1] // bc,
    nj=nj,
    nh=nh,
    mha=attn_kv.ndim == 4,
    off=s - t if ratio == 1 else 0,
    m=ratio,
    s=s,
    nq=qp.shape[1] // bt,
    nkb=kp.shape[1] // bs,
    b=b,
  )
  return qp, kp, wp, aq, kv, alse, cfg


def _call(kernel, name, grid, out_shape, args, bsz, interpret, bwd=False, aliases=None):
  warps = bsz.num_warps_bwd if bwd else bsz.num_warps
  stages = bsz.num_stages_bwd if bwd else bsz.num_stages
  return pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=grid,
    compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages),
    interpret=interpret,
    name=name,
    input_output_aliases=aliases or {},
  )(*args)


def _attn_lse_call(aq, kv, cfg, bsz, interpret):
  """Per-head attention lse [B,H,Tp] over each row's causal keys (padded operands)."""
  tp = aq.shape[1]
  return _call(
    functools.partial(_lse_kernel, c=cfg),
    "dense_kl_attn_lse",
    (cfg["nq"], cfg["b"], cfg["nh"]),
    jax.ShapeDtypeStruct((cfg["b"], cfg["nh"], tp), jnp.float32),
    (aq, kv),
    bsz,
    interpret,
  )


@functools.partial(jax.jit, static_argnames=("attn_scale", "block_sizes", "interpret", "ratio"))
def dense_kl_fwd(
  q, k, w, attn_q, attn_kv, attn_lse, *, attn_scale, block_sizes, interpret=False, ratio=1
):
  """(kl [B,T], residuals): residuals = (lse_I [B,Tp], ps [B,Tp], attention lse [B,H,Tp]).

  attn_lse [B,T,H] or None (then the lse kernel computes it from the target's logits).
  ratio m > 1: the keys are compressed entries of ratio m and query t (position t of the same
  sequence, from 0) sees entries j < (t+1)//m (DeepSeek-V4's CSA warm-up); attn_lse is then the
  layer's own (window and sink included) and must be given."""
  if ratio != 1 and attn_lse is None:
    raise ValueError(f"ratio={ratio} needs the layer's attn_lse (the lse kernel is causal only)")
  bsz = block_sizes
  qp, kp, wp, aq, kv, alse, cfg = _prepare(q, k, w, attn_q, attn_kv, attn_lse, bsz, ratio)
  cfg["scale"] = float(attn_scale)
  if alse is None:
    alse = _attn_lse_call(aq, kv, cfg, bsz, interpret)
  row = jax.ShapeDtypeStruct((cfg["b"], qp.shape[1]), jnp.float32)
  kl, lsei, ps = _call(
    functools.partial(_fwd_kernel, c=cfg),
    "dense_kl_fwd",
    (cfg["nq"], cfg["b"]),
    (row, row, row),
    (qp, kp, wp, aq, kv, alse),
    bsz,
    interpret,
  )
  return kl[:, : q.shape[1]], (lsei, ps, alse)


@functools.partial(jax.jit, static_argnames=("attn_scale", "block_sizes", "interpret"))
def dense_kl_fwd_grad(
  q, k, w, attn_q, attn_kv, attn_lse, *, attn_scale, block_sizes, interpret=False
):
  """Causal (ratio 1) forward for differentiation: (kl, res, dq1, dw1, dk1) with dq1 [B,T,J,D],
  dw1 [B,T,J] the gradients of Σ_t kl[t] (in q's, w's dtypes); for a cotangent dl they scale by
  dl[t] (both are per row). dk1 [B,S,D] f32: dk of Σ_t kl[t], which is dk for any cotangent
  equal on every row, times that value; otherwise dense_kl_bwd(with_dq=False) computes dk.

  Causal rows see every key their heads attend to, so each head's probabilities sum to 1 and
  the target's row sum is ps = H (given the attention's lse, or the lse kernel's). The indexer's
  lse then comes from a pass without the target, and one row sweep (the dq kernel) yields the
  KL value with dq, dw and dk: one target rebuild instead of three (fwd, dq, dk)."""
  bsz = block_sizes
  qp, kp, wp, aq, kv, alse, cfg = _prepare(q, k, w, attn_q, attn_kv, attn_lse, bsz)
  cfg["scale"] = float(attn_scale)
  cfg["barrier"] = not interpret
  if alse is None:
    alse = _attn_lse_call(aq, kv, cfg, bsz, interpret)
  b, tp, nj, dp = cfg["b"], qp.shape[1], cfg["nj"], qp.shape[-1]
  row = jax.ShapeDtypeStruct((b, tp), jnp.float32)
  lsei = _call(
    functools.partial(_lsei_kernel, c=cfg),
    "dense_kl_indexer_lse",
    (cfg["nq"], b),
    row,
    (qp, kp, wp),
    bsz,
    interpret,
  )
  ps = jnp.full((b, tp), float(cfg["nh"]), jnp.float32)
  ones = jnp.ones((b, tp), jnp.float32)
  args = (qp, kp, wp, aq, kv, alse, lsei, ps, ones)
  outs = [
    jax.ShapeDtypeStruct((b, tp, nj, dp), jnp.float32),
    jax.ShapeDtypeStruct((b, nj, tp), jnp.float32),
  ]
  cfg["fused_dk"] = True
  dk0 = jnp.zeros((b, kp.shape[1], dp), jnp.float32)
  args, outs = args + (dk0,), outs + [jax.ShapeDtypeStruct(dk0.shape, jnp.float32), row]
  dq, dw, dk, kl = _call(
    functools.partial(_dq_kernel, c=cfg),
    "dense_kl_fwd_dq",
    (cfg["nq"], b),
    tuple(outs),
    args,
    bsz,
    interpret,
    bwd=True,
    aliases={len(args) - 1: 2},
  )
  t, s, d = q.shape[1], k.shape[1], q.shape[-1]
  dq1 = dq[:, :t, :, :d].astype(q.dtype)
  dw1 = jnp.swapaxes(dw, 1, 2)[:, :t].astype(w.dtype)
  dk1 = dk[:, :s, :d]
  return kl[:, :t], (lsei, ps, alse), dq1, dw1, dk1


@functools.partial(
  jax.jit, static_argnames=("attn_scale", "block_sizes", "interpret", "ratio", "with_dq")
)
def dense_kl_bwd(
  q,
  k,
  w,
  attn_q,
  attn_kv,
  res,
  dl,
  *,
  attn_scale,
  block_sizes,
  interpret=False,
  ratio=1,
  with_dq=True,
):
  """(dq, dk, dw) of Σ_t dl[t]·kl[t], from dense_kl_fwd's residuals; in q's, k's, w's dtypes.
  with_dq=False: dk only (dq, dw None; dense_kl_fwd_grad made them)."""
  bsz = block_sizes
  lsei, ps, alse = res
  qp, kp, wp, aq, kv, _, cfg = _prepare(q, k, w, attn_q, attn_kv, None, bsz, ratio)
  cfg["scale"] = float(attn_scale)
  cfg["barrier"] = not interpret
  dlp = _common.pad_axis(dl.astype(jnp.float32), 1, cfg["bt"])
  args = (qp, kp, wp, aq, kv, alse, lsei, ps, dlp)
  b, tp, sp, dp = cfg["b"], qp.shape[1], kp.shape[1], qp.shape[-1]
  dq = dw = None
  if with_dq:
    dq, dw = _call(
      functools.partial(_dq_kernel, c=cfg),
      "dense_kl_bwd_dq",
      (cfg["nq"], b),
      (
        jax.ShapeDtypeStruct((b, tp, cfg["nj"], dp), jnp.float32),
        jax.ShapeDtypeStruct((b, cfg["nj"], tp), jnp.float32),
      ),
      args,
      bsz,
      interpret,
      bwd=True,
    )
  dk = _call(
    functools.partial(_dk_kernel, c=cfg),
    "dense_kl_bwd_dk",
    (cfg["nkb"], b),
    jax.ShapeDtypeStruct((b, sp, dp), jnp.float32),
    args,
    bsz,
    interpret,
    bwd=True,
  )
  t, s, d = q.shape[1], k.shape[1], q.shape[-1]
  dk = dk[:, :s, :d].astype(k.dtype)
  if not with_dq:
    return None, dk, None
  dq = dq[:, :t, :, :d].astype(q.dtype)
  dw = jnp.swapaxes(dw, 1, 2)[:, :t].astype(w.dtype)
  return dq, dk, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def dense_kl(q, k, w, attn_q, attn_kv, attn_lse, attn_scale, block_sizes, interpret=False, ratio=1):
  """Warm-up KL per query [B,T] f32, differentiable in q, k, w (the target is a constant).
  ratio: 1 causal over raw keys; m > 1 block-causal over compressed entries (dense_kl_fwd)."""
  kl, _ = dense_kl_fwd(
    q,
    k,
    w,
    *jax.lax.stop_gradient((attn_q, attn_kv, attn_lse)),
    attn_scale=attn_scale,
    block_sizes=block_sizes,
    interpret=interpret,
    ratio=ratio,
  )
  return kl


def _vjp_fwd(q, k, w, attn_q, attn_kv, attn_lse, attn_scale, block_sizes, interpret, ratio):
  aq, akv, al = jax.lax.stop_gradient((attn_q, attn_kv, attn_lse))
  args = (q, k, w, aq, akv, al)
  kw = dict(attn_scale=attn_scale, block_sizes=block_sizes, interpret=interpret)
  if ratio == 1 and GRAD_IN_FORWARD:
    kl, res, dq1, dw1, dk1 = dense_kl_fwd_grad(*args, **kw)
    res, dq1, dw1, dk1 = _common.saved((res, dq1, dw1, dk1))
    return kl, (q, k, w, aq, akv, res, dq1, dw1, dk1)
  kl, res = dense_kl_fwd(*args, **kw, ratio=ratio)
  return kl, (q, k, w, aq, akv, _common.saved(res), None, None, None)


def _vjp_bwd(attn_scale, block_sizes, interpret, ratio, saved, dl):
  q, k, w, aq, akv, res, dq1, dw1, dk1 = saved
  bwd = lambda: dense_kl_bwd(
    q,
    k,
    w,
    aq,
    akv,
    res,
    dl,
    attn_scale=attn_scale,
    block_sizes=block_sizes,
    interpret=interpret,
    ratio=ratio,
    with_dq=dq1 is None,
  )
  if dk1 is None:
    dq, dk, dw = bwd()
  else:  # the forward's dk holds for a cotangent equal on every row; else the dk kernel
    dl0 = dl.reshape(-1)[0].astype(jnp.float32)
    dk = jax.lax.cond(
      jnp.all(dl == dl.reshape(-1)[0]),
      lambda: (dk1 * dl0).astype(k.dtype),
      lambda: bwd()[1],
    )
  if dq1 is not None:  # per-row gradients of Σ_t kl[t], scaled by the row's cotangent
    dlf = dl.astype(jnp.float32)
    dq = (dq1.astype(jnp.float32) * dlf[:, :, None, None]).astype(q.dtype)
    dw = (dw1.astype(jnp.float32) * dlf[:, :, None]).astype(w.dtype)
  return dq, dk, dw, None, None, None


dense_kl.defvjp(_vjp_fwd, _vjp_bwd)
