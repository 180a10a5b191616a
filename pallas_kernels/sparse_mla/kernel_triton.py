# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Head-mean sparse-attention probabilities (the sparse KL target) as a Pallas-Triton GPU kernel.

Layout the wrapper (ops.py) hands to the kernel (batch folded into rows, like the forward):
  qn [N, Hp, Dv], qr [N, Hp, Dr]   q split into its largest power-of-2 leading part and the
                                   rest (V3.2: 576 = 512 + 64), each zero-padded to a power of 2
                                   (Triton tiles); Dr = 0 when K is a power of 2 (no rest).
  kvn [R, Dv], kvr [R, Dr]         the latent rows split the same way, R = B*S
  lse [N, Hp] f32                  the forward's lse (+inf for padded heads and rows with no
                                   valid slot: their P is 0)
  idx [N, kp] int32                global row ids (b*S + s), -1 for an invalid slot, kp % bk == 0

grid (N, kp/bk): one token x one chunk of bk slots gathers the chunk's rows once and walks the
heads in blocks of bh: p = Σ_h exp(scale·q_h·rowᵀ - lse_h) / H, 0 at invalid slots; chunks with
no valid slot are skipped. Nothing [N, k, K]-sized is gathered (the reference gathers the rows a
second time in XLA). Dots take bf16/f16 operands on the tensor cores with f32 accumulation. On
CPU the same kernel runs under interpret=True.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common


def _pow2(n: int) -> bool:
  return n > 0 and not n & (n - 1)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_h heads x block_k slots per tile (powers of 2 >= 16); num_warps / num_stages: Triton's."""

  block_h: int = 32
  block_k: int = 128
  num_warps: int = 8
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_h", "block_k"):
      v = getattr(self, name)
      if not _pow2(v) or v < 16:
        raise ValueError(f"{name}={v} must be a power of 2 >= 16")


def split_dims(k_dim: int) -> tuple[int, int, int]:
  """(lead, Dv, Dr) for K-wide rows: the largest power of 2 <= K (the leading part) and the padded
  widths of that part and of the rest (Dr 0 if there is none)."""
  lead = 1 << (k_dim.bit_length() - 1)
  dr = 0 if k_dim == lead else max(16, pl.next_power_of_2(k_dim - lead))
  return lead, max(16, lead), dr


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
  return valid, rn, rr


def _probs_tile(qn, qr, lse, rn, rr, valid, scale):
  """P [bh, bk] f32 = exp(scale·q·rowᵀ - lse), 0 at invalid slots."""
  s = _dot(qn, rn, 1, 1)
  if rr is not None:
    s = s + _dot(qr, rr, 1, 1)
  p = _common.exp_rows(s, scale, lse)
  return jnp.where(valid[None, :], p, jnp.float32(0))


def _probs_kernel(*refs, c):
  if c["dr"]:
    idx_ref, qn_ref, qr_ref, lse_ref, kvn_ref, kvr_ref, p_ref = refs
  else:
    idx_ref, qn_ref, lse_ref, kvn_ref, p_ref = refs
    qr_ref = kvr_ref = None
  bh, bk = c["bh"], c["bk"]
  n, j = pl.program_id(0), pl.program_id(1)
  valid, rn, rr = _rows(idx_ref, kvn_ref, kvr_ref, n, j, bk)

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


def _config(qn, qr, idx, scale, h, bsz):
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
  )


def _some(*xs):
  return tuple(x for x in xs if x is not None)


@functools.partial(jax.jit, static_argnames=("scale", "h", "block_sizes", "interpret"))
def sparse_mla_probs(qn, qr, lse, kvn, kvr, idx, *, scale, h, block_sizes, interpret=False):
  """Head-mean probabilities [N, kp] f32 at the selected slots (0 at invalid ones)."""
  bsz = block_sizes
  c = _config(qn, qr, idx, scale, h, bsz)
  return pl.pallas_call(
    functools.partial(_probs_kernel, c=c),
    out_shape=jax.ShapeDtypeStruct(idx.shape, jnp.float32),
    grid=(qn.shape[0], c["nk"]),
    compiler_params=_params(bsz),
    interpret=interpret,
    name="sparse_mla_probs",
  )(*_some(idx, qn, qr, lse, kvn, kvr))
