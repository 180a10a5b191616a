# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sparse-MLA backward and head-mean probabilities as Pallas-Triton GPU kernels.

Layout the wrapper (ops.py) hands to the kernels (batch folded into rows, like the forward):
  qn [N, Hp, Dv], qr [N, Hp, Dr]   q split into its value part (the first d_v dims) and the rest
                                   (V3.2: 512 + 64), each zero-padded to a power of 2 (Triton
                                   tiles); Dr = 0 when K = d_v (no second part).
  kvn [R, Dv], kvr [R, Dr]         the latent rows split the same way, R = B*S
  don [N, Hp, Dv]                  dO
  lse, dd [N, Hp] f32              the forward's lse (+inf for padded heads and rows with no
                                   valid slot: their P is 0), dd = Δ - dlse, Δ = rowsum(O ⊙ dO)
  idx [N, kp] int32                global row ids (b*S + s), -1 for an invalid slot, kp % bk == 0

With P = exp(scale·q·rowᵀ - lse) per (token, head, slot) and dS = P ⊙ (dO·rowᵀ[:d_v] - dd):
  dq kernel   grid (N, Hp/bh): one token x bh heads walks its slots in chunks of bk, gathers the
              chunk's rows, and accumulates dq = scale·dS·rows in registers (no other writer).
  dkv kernel  grid (N, kp/bk): one token x one chunk of bk slots gathers its rows once, walks the
              heads in blocks of bh and accumulates drows = scale·dSᵀ·q + Pᵀ·dO (value dims) in
              registers, then adds them to the f32 dkv rows with one masked atomic add per
              element (rows chosen by several tokens add up; invalid slots are masked off).
  probs       grid (N, kp/bk): the same walk, Σ_h P / H: the sparse KL target.
The two backward kernels recompute P and dP (the split keeps each program's accumulator, dq
[bh, Dv+Dr] or drows [bk, Dv+Dr], within the register file, and dkv takes one atomic per row
element and token, not one per head block). Chunks with no valid slot are skipped.
Dots take bf16/f16 operands on the tensor cores with f32 accumulation; dS and P are cast to the
operands' dtype before their dots (as flash attention casts P). On CPU the same kernels run
under interpret=True.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def _pow2(n: int) -> bool:
  return n > 0 and not n & (n - 1)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_h heads x block_k slots per tile (powers of 2 >= 16); num_warps / num_stages:
  Triton's, for all three kernels."""

  block_h: int = 64
  block_k: int = 32
  num_warps: int = 8
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_h", "block_k"):
      v = getattr(self, name)
      if not _pow2(v) or v < 16:
        raise ValueError(f"{name}={v} must be a power of 2 >= 16")


def split_dims(k_dim: int, d_v: int) -> tuple[int, int]:
  """(Dv, Dr): padded widths of the value part and of the rest of a K-wide row (Dr 0 if none)."""
  dv = max(16, pl.next_power_of_2(d_v))
  dr = 0 if k_dim == d_v else max(16, pl.next_power_of_2(k_dim - d_v))
  return dv, dr


def _any(valid):
  """Whether any slot of the chunk is valid (Triton lowers max, not reduce_or)."""
  return jnp.max(valid.astype(jnp.int32)) > 0


def _dot(a, b, ca, cb):
  """a·b contracting a's axis ca with b's axis cb, f32 accumulation (2-D operands)."""
  return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=jnp.float32)


def _rows(idx_ref, kvn_ref, kvr_ref, n, j, bk):
  """The chunk's slot validity [bk] and gathered rows ([bk, Dv], [bk, Dr] or None); invalid
  slots read row 0 (in bounds) and are masked by the caller."""
  ids = idx_ref[n, pl.ds(j * bk, bk)]
  valid = ids >= 0
  safe = jnp.where(valid, ids, 0)
  rn = kvn_ref[safe, :]
  rr = None if kvr_ref is None else kvr_ref[safe, :]
  return ids, valid, safe, rn, rr


def _probs_tile(qn, qr, lse, rn, rr, valid, scale):
  """P [bh, bk] f32 = exp(scale·q·rowᵀ - lse), 0 at invalid slots."""
  s = _dot(qn, rn, 1, 1)
  if rr is not None:
    s = s + _dot(qr, rr, 1, 1)
  p = jnp.exp(s * jnp.float32(scale) - lse[:, None])
  return jnp.where(valid[None, :], p, jnp.float32(0))


def _dq_kernel(*refs, c):
  if c["dr"]:
    idx_ref, qn_ref, qr_ref, do_ref, lse_ref, dd_ref, kvn_ref, kvr_ref, dqn_ref, dqr_ref = refs
  else:
    idx_ref, qn_ref, do_ref, lse_ref, dd_ref, kvn_ref, dqn_ref = refs
    qr_ref = kvr_ref = dqr_ref = None
  bh, bk = c["bh"], c["bk"]
  n = pl.program_id(0)
  h0 = pl.program_id(1) * bh
  qn = qn_ref[n, pl.ds(h0, bh), :]
  qr = None if qr_ref is None else qr_ref[n, pl.ds(h0, bh), :]
  do = do_ref[n, pl.ds(h0, bh), :]
  lse = lse_ref[n, pl.ds(h0, bh)]
  dd = dd_ref[n, pl.ds(h0, bh)]

  def chunk(j, acc):
    _, valid, _, rn, rr = _rows(idx_ref, kvn_ref, kvr_ref, n, j, bk)

    def add(acc):
      p = _probs_tile(qn, qr, lse, rn, rr, valid, c["scale"])
      ds = (p * (_dot(do, rn, 1, 1) - dd[:, None])).astype(rn.dtype)
      an, ar = acc
      an = an + _dot(ds, rn, 1, 0)
      if rr is not None:
        ar = ar + _dot(ds, rr, 1, 0)
      return an, ar

    return jax.lax.cond(_any(valid), add, lambda a: a, acc)

  an = jnp.zeros((bh, qn.shape[-1]), jnp.float32)
  ar = jnp.zeros((bh, c["dr"] or 1), jnp.float32)  # a dummy when there is no second part
  an, ar = jax.lax.fori_loop(0, c["nk"], chunk, (an, ar))
  sc = jnp.float32(c["scale"])
  dqn_ref[n, pl.ds(h0, bh), :] = (an * sc).astype(dqn_ref.dtype)
  if dqr_ref is not None:
    dqr_ref[n, pl.ds(h0, bh), :] = (ar * sc).astype(dqr_ref.dtype)


def _dkv_kernel(*refs, c):
  # inputs, then the zero-filled f32 buffers (aliased to the outputs), then the outputs
  if c["dr"]:
    idx_ref, qn_ref, qr_ref, do_ref, lse_ref, dd_ref, kvn_ref, kvr_ref = refs[:8]
    dkvn_ref, dkvr_ref = refs[10:]
  else:
    idx_ref, qn_ref, do_ref, lse_ref, dd_ref, kvn_ref = refs[:6]
    (dkvn_ref,) = refs[7:]
    qr_ref = kvr_ref = dkvr_ref = None
  bh, bk = c["bh"], c["bk"]
  n, j = pl.program_id(0), pl.program_id(1)
  _, valid, safe, rn, rr = _rows(idx_ref, kvn_ref, kvr_ref, n, j, bk)

  @pl.when(_any(valid))
  def _():
    def head_block(i, acc):
      h0 = i * bh
      qn = qn_ref[n, pl.ds(h0, bh), :]
      qr = None if qr_ref is None else qr_ref[n, pl.ds(h0, bh), :]
      do = do_ref[n, pl.ds(h0, bh), :]
      lse = lse_ref[n, pl.ds(h0, bh)]
      dd = dd_ref[n, pl.ds(h0, bh)]
      p = _probs_tile(qn, qr, lse, rn, rr, valid, c["scale"])
      ds = (p * (_dot(do, rn, 1, 1) - dd[:, None]) * jnp.float32(c["scale"])).astype(qn.dtype)
      an, ar = acc
      an = an + _dot(ds, qn, 0, 0) + _dot(p.astype(do.dtype), do, 0, 0)
      if qr is not None:
        ar = ar + _dot(ds, qr, 0, 0)
      return an, ar

    an = jnp.zeros((bk, rn.shape[-1]), jnp.float32)
    ar = jnp.zeros((bk, c["dr"] or 1), jnp.float32)
    an, ar = jax.lax.fori_loop(0, c["nh"], head_block, (an, ar))
    if c["interpret"]:
      # The interpreter's atomic add takes no mask, and with a vector of row ids it sets instead
      # of adding when an id repeats: add row by row (invalid slots add their exact zeros).
      def add_row(r, carry):
        row = jax.lax.dynamic_index_in_dim(safe, r, keepdims=False)
        for ref, a in ((dkvn_ref, an), (dkvr_ref, ar)):
          if ref is not None:
            val = jax.lax.dynamic_index_in_dim(a, r, keepdims=False)
            pltriton.atomic_add(ref, (row, pl.ds(0, a.shape[1])), val)
        return carry

      jax.lax.fori_loop(0, bk, add_row, 0)
    else:
      pltriton.atomic_add(
        dkvn_ref, (safe, slice(None)), an, mask=jnp.broadcast_to(valid[:, None], an.shape)
      )
      if dkvr_ref is not None:
        pltriton.atomic_add(
          dkvr_ref, (safe, slice(None)), ar, mask=jnp.broadcast_to(valid[:, None], ar.shape)
        )


def _probs_kernel(*refs, c):
  if c["dr"]:
    idx_ref, qn_ref, qr_ref, lse_ref, kvn_ref, kvr_ref, p_ref = refs
  else:
    idx_ref, qn_ref, lse_ref, kvn_ref, p_ref = refs
    qr_ref = kvr_ref = None
  bh, bk = c["bh"], c["bk"]
  n, j = pl.program_id(0), pl.program_id(1)
  _, valid, _, rn, rr = _rows(idx_ref, kvn_ref, kvr_ref, n, j, bk)

  def head_block(i, acc):
    h0 = i * bh
    qn = qn_ref[n, pl.ds(h0, bh), :]
    qr = None if qr_ref is None else qr_ref[n, pl.ds(h0, bh), :]
    p = _probs_tile(qn, qr, lse_ref[n, pl.ds(h0, bh)], rn, rr, valid, c["scale"])
    return acc + jnp.sum(p, axis=0)

  acc = jax.lax.cond(
    _any(valid),
    lambda: jax.lax.fori_loop(0, c["nh"], head_block, jnp.zeros((bk,), jnp.float32)),
    lambda: jnp.zeros((bk,), jnp.float32),
  )
  p_ref[n, pl.ds(j * bk, bk)] = acc * jnp.float32(1.0 / c["h"])


def _params(bsz: BlockSizes):
  return pltriton.CompilerParams(num_warps=bsz.num_warps, num_stages=bsz.num_stages)


def _config(qn, qr, idx, scale, h, bsz, interpret):
  hp, kp = qn.shape[1], idx.shape[1]
  if hp % bsz.block_h or kp % bsz.block_k:
    raise ValueError(f"padded heads {hp} / slots {kp} must be multiples of {bsz}")
  return dict(
    bh=bsz.block_h,
    bk=bsz.block_k,
    nh=hp // bsz.block_h,
    nk=kp // bsz.block_k,
    dr=0 if qr is None else qr.shape[-1],
    scale=float(scale),
    h=h,
    interpret=bool(interpret),
  )


def _some(*xs):
  return tuple(x for x in xs if x is not None)


@functools.partial(jax.jit, static_argnames=("scale", "h", "block_sizes", "interpret"))
def sparse_mla_bwd(qn, qr, don, lse, dd, kvn, kvr, idx, *, scale, h, block_sizes, interpret=False):
  """(dqn [N,Hp,Dv], dqr [N,Hp,Dr] or None) in q's dtype, (dkvn [R,Dv], dkvr [R,Dr] or None) f32.

  Layout and math: module docstring. h: the real head count (padded heads carry lse = +inf).
  """
  bsz = block_sizes
  c = _config(qn, qr, idx, scale, h, bsz, interpret)
  n, hp = qn.shape[:2]
  ins = _some(idx, qn, qr, don, lse, dd, kvn, kvr)
  sds = jax.ShapeDtypeStruct
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, c=c),
    out_shape=_some(sds(qn.shape, qn.dtype), None if qr is None else sds(qr.shape, qr.dtype)),
    grid=(n, c["nh"]),
    compiler_params=_params(bsz),
    interpret=interpret,
    name="sparse_mla_bwd_dq",
  )(*ins)
  zeros = _some(
    jnp.zeros(kvn.shape, jnp.float32), None if kvr is None else jnp.zeros(kvr.shape, jnp.float32)
  )
  first = len(ins)
  dkv = pl.pallas_call(
    functools.partial(_dkv_kernel, c=c),
    out_shape=tuple(sds(z.shape, jnp.float32) for z in zeros),
    grid=(n, c["nk"]),
    input_output_aliases={first + i: i for i in range(len(zeros))},
    compiler_params=_params(bsz),
    interpret=interpret,
    name="sparse_mla_bwd_dkv",
  )(*ins, *zeros)
  dq = tuple(dq) + (None,) * (2 - len(dq))
  dkv = tuple(dkv) + (None,) * (2 - len(dkv))
  return dq, dkv


@functools.partial(jax.jit, static_argnames=("scale", "h", "block_sizes", "interpret"))
def sparse_mla_probs(qn, qr, lse, kvn, kvr, idx, *, scale, h, block_sizes, interpret=False):
  """Head-mean probabilities [N, kp] f32 at the selected slots (0 at invalid ones)."""
  bsz = block_sizes
  c = _config(qn, qr, idx, scale, h, bsz, interpret)
  return pl.pallas_call(
    functools.partial(_probs_kernel, c=c),
    out_shape=jax.ShapeDtypeStruct(idx.shape, jnp.float32),
    grid=(qn.shape[0], c["nk"]),
    compiler_params=_params(bsz),
    interpret=interpret,
    name="sparse_mla_probs",
  )(*_some(idx, qn, qr, lse, kvn, kvr))
