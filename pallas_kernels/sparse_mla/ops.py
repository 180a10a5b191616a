# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Public sparse-MLA ops: shape validation and the impl switch ("reference" | "pallas").

impl="pallas" runs one kernel set per backend under a custom VJP that honours both cotangents
(out and lse):
  gpu: the warp-specialised Mosaic GPU forward (kernel_mosaic_gpu.py, `GpuConfig`) and, from the
       saved lse, the Mosaic GPU backward kernel for dq and the [dS; P] tiles
       (kernel_mosaic_gpu_bwd.py) with the dK rows in XLA (`_bwd_kernel_blocked`); where its
       tiles do not fit, GpuConfig(bwd="xla"): the blocked XLA backward (`_bwd_blocked`). Both
       sum dkv per row with the Pallas-Triton segment sum (kernel_segment_sum_triton.py) after
       a sort of the slot ids;
  tpu: the Mosaic TPU forward and backward kernels (kernel_tpu.py, `kernel_tpu.BlockSizes`).
`sparse_mla_probs` (the sparse KL target) takes the Mosaic GPU kernel of
kernel_mosaic_gpu_probs.py on a GPU when GPU_PROBS_KERNEL is on and the inputs suit it (bf16 or
f16, the token's slot ids within its SMEM budget, `kernel_mosaic_gpu_probs.fits`), else the
reference.
"""

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels.sparse_mla import (
  kernel_mosaic_gpu,
  kernel_mosaic_gpu_bwd,
  kernel_mosaic_gpu_probs,
  kernel_segment_sum_triton,
  kernel_tpu,
  reference,
)

_LOG2E = math.log2(math.e)
IMPLS = ("reference", "pallas")
BACKENDS = ("gpu", "tpu")
GpuConfig = kernel_mosaic_gpu.GpuConfig

# On a GPU the head-mean probabilities come from the Mosaic GPU kernel
# (kernel_mosaic_gpu_probs.py; tests/pallas_kernels/test_sparse_mla_probs_mosaic.py -m gpu);
# False: the reference.
GPU_PROBS_KERNEL = True


def _check(q, kv, idx, d_v):
  if q.ndim != 4:
    raise ValueError(f"q must be [B,T,H,K], got shape {q.shape}")
  if kv.ndim != 3:
    raise ValueError(f"kv must be [B,S,K], got shape {kv.shape}")
  if idx.ndim != 3:
    raise ValueError(f"idx must be [B,T,k], got shape {idx.shape}")
  if q.shape[0] != kv.shape[0] or q.shape[0] != idx.shape[0]:
    raise ValueError(f"batch mismatch: q {q.shape}, kv {kv.shape}, idx {idx.shape}")
  if q.shape[1] != idx.shape[1]:
    raise ValueError(f"q has T={q.shape[1]} queries but idx has {idx.shape[1]} rows")
  if q.shape[-1] != kv.shape[-1]:
    raise ValueError(f"q head dim {q.shape[-1]} != kv row dim {kv.shape[-1]}")
  if not 0 < d_v <= kv.shape[-1]:
    raise ValueError(f"d_v={d_v} must be in [1, {kv.shape[-1]}]")
  if idx.dtype.kind not in "iu":
    raise ValueError(f"idx must be an integer array, got {idx.dtype}")


def sparse_mla(
  q,
  kv,
  idx,
  *,
  scale: float,
  d_v: int,
  impl: str = "reference",
  interpret=False,
  backend: str | None = None,
  config: GpuConfig | kernel_tpu.BlockSizes | None = None,
):
  """out [B,T,H,V], lse [B,T,H] = softmax(scale·q·kv[idx]) · kv[idx][:d_v]. See reference.py.

  impl="pallas": backend ("gpu" | "tpu"; default "tpu" when jax.default_backend() is "tpu",
  else "gpu") picks the kernel set (module docstring). `interpret`: True runs the kernels in the
  Pallas interpreter (plgpu.InterpretGPUParams() on "gpu", pltpu.InterpretParams() on "tpu";
  those objects may be passed instead).
  config: the backend's settings, GpuConfig or kernel_tpu.BlockSizes; default the backend's
  `default_for`. GpuConfig.default_for picks the backward (the kernel, or the XLA one where its
  tiles do not fit in SMEM); the GPU forward is one kernel for any top-k, which raises
  ValueError where its tiles do not fit (`kernel_mosaic_gpu.fits`: Kp <= 576 in bf16).
  """
  _check(q, kv, idx, d_v)
  if impl == "reference":
    return reference.sparse_mla_reference(q, kv, idx, scale=scale, d_v=d_v)
  if impl != "pallas":
    raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
  backend = backend or ("tpu" if jax.default_backend() == "tpu" else "gpu")
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
  idx = idx.astype(jnp.int32)
  if backend == "tpu":
    if q.dtype != kv.dtype or q.dtype not in (jnp.bfloat16, jnp.float32):
      raise ValueError(f"TPU kernels need q and kv both bf16 or f32, got {q.dtype}, {kv.dtype}")
    if config is not None and not isinstance(config, kernel_tpu.BlockSizes):
      raise ValueError(f"backend='tpu' takes a kernel_tpu.BlockSizes config, got {config!r}")
    if interpret is True:
      from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

      interpret = pltpu.InterpretParams()
    bs = config or kernel_tpu.BlockSizes.default_for(idx.shape[-1])
    return kernel_tpu.sparse_mla_tpu(q, kv, idx, float(scale), int(d_v), bs, interpret or False)
  if q.dtype != kv.dtype or q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"impl='pallas' needs q and kv both bf16 or f16, got {q.dtype}, {kv.dtype}")
  if config is not None and not isinstance(config, GpuConfig):
    raise ValueError(f"backend='gpu' takes a GpuConfig, got {config!r}")
  interpret = _gpu_interpret(interpret)
  config = config or GpuConfig.default_for((q.shape[-1], d_v, idx.shape[-1]))
  return _sparse_mla_gpu(q, kv, idx, float(scale), int(d_v), interpret or False, config)


def sparse_mla_probs(q, kv, idx, lse, *, scale: float, impl: str = "reference", interpret=False):
  """Head-mean attention probabilities at the selected slots [B,T,k] (sparse KL target).

  impl="pallas" takes the Mosaic GPU kernel on a GPU when GPU_PROBS_KERNEL is on, or on CPU with
  interpret=True (tests), for bf16/f16 inputs whose slot ids fit its SMEM; otherwise the
  reference."""
  _check(q, kv, idx, kv.shape[-1])
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
  on_gpu = jax.default_backend() == "gpu" and GPU_PROBS_KERNEL
  if impl == "reference" or not (interpret or on_gpu) or not _mosaic_probs_fit(q, kv, idx):
    return reference.sparse_mla_probs_reference(q, kv, idx, lse, scale=scale)
  # The target is a constant: cut the inputs before the kernel (a Pallas call has no JVP rule).
  q, kv, lse = jax.lax.stop_gradient((q, kv, lse))
  return _mosaic_probs(q, kv, idx.astype(jnp.int32), lse, scale, interpret)


def _mosaic_probs_fit(q, kv, idx):
  kp_dim, _, kp = kernel_mosaic_gpu.padded_dims(q.shape[-1], 0, idx.shape[-1])
  dtype_ok = q.dtype == kv.dtype and q.dtype in (jnp.bfloat16, jnp.float16)
  return dtype_ok and kernel_mosaic_gpu_probs.fits(kp_dim, kp, q.dtype.itemsize)


def _mosaic_probs(q, kv, idx, lse, scale, interpret):
  """kernel_mosaic_gpu_probs on the forward's folded layout; head blocks summed, / H."""
  b, t, h, k_dim = q.shape
  kp_dim, _, _ = kernel_mosaic_gpu.padded_dims(k_dim, 0, idx.shape[-1])
  hp = _round_up(h, kernel_mosaic_gpu.HEAD_BLOCK)
  qf, kvf, gidx = _fold(q, kv, idx, hp, kp_dim, kernel_mosaic_gpu.BLOCK_K)
  lse2 = _pad_heads(lse.astype(jnp.float32), hp, jnp.inf) * _LOG2E
  interpret = _gpu_interpret(interpret)
  sums = kernel_mosaic_gpu_probs.sparse_mla_probs(
    qf, kvf, gidx, lse2, qk_scale=float(scale) * _LOG2E, interpret=interpret or False
  )
  # The kernel does not write the chunks past a token's last valid slot (live_chunks): zero them.
  p = jnp.where(gidx >= 0, sums.sum(axis=1), 0.0)[:, : idx.shape[-1]] / h
  return p.reshape(b, t, -1)


# ---------------------------------------------------------------------------------------------
# backend="gpu"


def _gpu_interpret(interpret):
  """True -> the Mosaic GPU interpreter's default params; params objects and False pass."""
  if interpret is True:
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

    return plgpu.InterpretGPUParams()
  return interpret


def _round_up(x, m):
  return -(-x // m) * m


def _global_idx(idx, s, block_k):
  """[B*T, kp] row ids into the batch-folded rows (b*S + s), invalid -> -1, slots padded to a
  multiple of block_k with -1."""
  b = idx.shape[0]
  valid = (idx >= 0) & (idx < s)
  gidx = jnp.where(valid, idx + (jnp.arange(b, dtype=jnp.int32) * s)[:, None, None], -1)
  return _common.pad_axis(gidx.reshape(-1, idx.shape[-1]), 1, block_k, value=-1)


def _fold(q, kv, idx, hp, d, block_k):
  """The kernel's flat layout: batch folded into rows (slot ids offset by b*S, invalid -> -1),
  heads padded to hp, the feature dim to d and the slots to a multiple of block_k."""
  b, t, h, k_dim = q.shape
  s = kv.shape[1]
  qf = jnp.pad(_pad_heads(q, hp), ((0, 0), (0, 0), (0, d - k_dim)))
  kvf = jnp.pad(kv, ((0, 0), (0, 0), (0, d - k_dim))).reshape(b * s, d)
  return qf, kvf, _global_idx(idx, s, block_k)


def _pad_heads(x, hp, value=0):
  """[B,T,H,...] -> [B*T, Hp, ...], the extra heads filled with `value`."""
  b, t, h = x.shape[:3]
  x = jnp.pad(x, ((0, 0), (0, 0), (0, hp - h)) + ((0, 0),) * (x.ndim - 3), constant_values=value)
  return x.reshape((b * t, hp) + x.shape[3:])


def _gpu_fwd_call(q, kv, idx, scale, d_v, interpret, config):
  """Folds batch into rows, pads to the kernel's granules, runs it, and un-pads."""
  b, t, h, k_dim = q.shape
  kp_dim, d_out, _ = kernel_mosaic_gpu.padded_dims(k_dim, d_v, idx.shape[-1])
  hp = _round_up(h, kernel_mosaic_gpu.HEAD_BLOCK)
  qf, kvf, gidx = _fold(q, kv, idx, hp, kp_dim, kernel_mosaic_gpu.BLOCK_K)
  out, lse = kernel_mosaic_gpu.sparse_mla_fwd(
    qf, kvf, gidx, scale=scale, d_out=d_out, config=config, interpret=interpret
  )
  return out[:, :h, :d_v].reshape(b, t, h, d_v), lse[:, :h].reshape(b, t, h)


def _bwd_blocked(
  q,
  kv,
  idx,
  out,
  lse,
  d_out,
  d_lse,
  *,
  scale,
  d_v,
  block_t,
  update_dtype=None,
  interpret=False,
):
  """dq, dkv from the saved lse (no softmax renormalisation), query blocks scanned in XLA.

  With P = exp(scale·q·kᵀ - lse): dS = P ⊙ (dO·Vᵀ - Δ + dlse), Δ = rowsum(O ⊙ dO);
  dq = scale·dS·K; dK_rows = scale·dSᵀ·q (+ Pᵀ·dO on the value dims), summed into dkv per row
  (duplicates across queries add up; invalid slots are dropped).
  [q; dO] are stacked on the head axis, so the logits and dP are one matmul over the gathered
  rows ([2h, K] x [K, k]) and the dK_rows one more ([dS; P]ᵀ x [q; dO], contraction 2h).
  Per scan step the slot ids are sorted by row (batch folded: row b*S + id) and the
  Pallas-Triton segment sum (kernel_segment_sum_triton.py) adds each row's dK_rows once into an
  f32 dkv (columns padded to 64s); interpret runs it in the Triton interpreter.
  block_t: query tokens per scan step (per batch row); update_dtype: dK_rows rounded to it
  before the f32 sum (less traffic; default f32).
  """
  b, t, h, k_dim = q.shape
  s = kv.shape[1]
  f32 = jnp.float32
  delta = jnp.einsum("bthv,bthv->bth", out.astype(f32), d_out.astype(f32))
  d_lse = jnp.where(jnp.isfinite(lse), d_lse, 0.0)
  n = -(-t // block_t)

  def split(x, fill=0):
    x = _common.pad_axis(x, 1, block_t, value=fill)
    return jnp.moveaxis(x.reshape((b, n, block_t) + x.shape[2:]), 1, 0)

  xs = (split(q), split(idx, -1), split(lse, jnp.inf), split(d_out), split(delta), split(d_lse))

  def body(dkv, blk):
    qb, ib, lb, dob, deb, dlb = blk
    valid = (ib >= 0) & (ib < s)
    safe = jnp.where(valid, ib, 0)
    rows = jax.vmap(lambda kv_b, i_b: kv_b[i_b])(kv, safe)  # [b,tb,k,K]
    qd = jnp.concatenate([qb, jnp.pad(dob, ((0, 0),) * 3 + ((0, k_dim - d_v),))], axis=2)
    sd = jnp.einsum("bthc,btsc->bths", qd, rows, preferred_element_type=f32)
    logits, dp = sd[:, :, :h] * scale, sd[:, :, h:]
    p = jnp.where(valid[:, :, None, :], jnp.exp(logits - lb[..., None]), 0.0)
    ds = p * (dp - deb[..., None] + dlb[..., None])
    # dq reads the first h heads of the rounded scale·dS that the dK rows need anyway: rounding
    # dS for dq alone was a second pass over the f32 [tb, 2h, k] products.
    a = jnp.concatenate([(ds * scale).astype(q.dtype), p.astype(q.dtype)], axis=2)
    dq = jnp.einsum("bths,btsc->bthc", a[:, :, :h], rows, preferred_element_type=f32)
    drows = jnp.einsum("bths,bthc->btsc", a, qd, preferred_element_type=update_dtype or f32)
    order, starts = kernel_segment_sum_triton.sort_segments(
      _global_idx(ib, s, 1).reshape(-1), b * s
    )
    rows_d = _common.pad_axis(drows.reshape(-1, k_dim), 1, 64)
    dkv = kernel_segment_sum_triton.segment_sum_rows(
      rows_d, order, starts, dkv, interpret=bool(interpret)
    )
    return dkv, dq.astype(q.dtype)

  dkv0 = jnp.zeros((b * s, _round_up(k_dim, 64)), f32)
  dkv, dq = jax.lax.scan(body, dkv0, xs)
  dq = jnp.moveaxis(dq, 0, 1).reshape(b, n * block_t, h, k_dim)[:, :t]
  return dq, dkv[:, :k_dim].reshape(kv.shape).astype(kv.dtype)


def balanced_step(t: int, block_t: int) -> int:
  """Tokens per scan step for t tokens in steps of at most block_t: as many steps as block_t
  needs, evened out, so the padding of the last step is under one token per step (t 1536 at
  1024 takes two steps of 768, not 1024 + 512 padded to 1024 + 1024)."""
  block_t = max(1, min(block_t, t))
  n = -(-t // block_t)
  return -(-t // n)


def _gpu_bwd_call(q, kv, idx, out, lse, d_out, d_lse, scale, d_v, config, interpret=False):
  # Scan steps cover config.bwd_block_t tokens summed over the batch (the gathered rows of one
  # step scale with b * block_t), so a larger batch takes shorter steps, not more memory; and
  # a step's dK rows (b * block_t * k rows of 64-padded columns) stay below 2**31 elements, the
  # int32 offsets of the segment sum.
  b = q.shape[0]
  per_token = b * idx.shape[-1] * _round_up(q.shape[-1], 64)
  block_t = min(config.bwd_block_t // b, kernel_segment_sum_triton.max_tokens(per_token))
  block_t = balanced_step(q.shape[1], block_t)
  res = (q, kv, idx, out, lse, d_out, d_lse)
  if config.bwd == "kernel":
    return _bwd_kernel_blocked(*res, scale=scale, d_v=d_v, block_t=b * block_t, interpret=interpret)
  return _bwd_blocked(
    *res,
    scale=scale,
    d_v=d_v,
    block_t=block_t,
    update_dtype=jnp.bfloat16,
    interpret=interpret,
  )


def _bwd_kernel_blocked(q, kv, idx, out, lse, d_out, d_lse, *, scale, d_v, block_t, interpret):
  """GpuConfig.bwd="kernel": per scan step of block_t tokens (batch folded), the Mosaic GPU
  kernel (kernel_mosaic_gpu_bwd.py) gives dq, a = [dS; P] at the selected slots and the stacked
  qd = [q; dO]; the dK rows aᵀ·qd are one dense product per token, and the slot ids sorted by
  row let the segment sum add them into an f32 dkv, as _bwd_blocked does (the rows of invalid
  slots, which the kernel may leave unwritten, are never read)."""
  b, t, h, k_dim = q.shape
  f32 = jnp.float32
  kp_dim, d_outp, _ = kernel_mosaic_gpu.padded_dims(k_dim, d_v, idx.shape[-1])
  if not kernel_mosaic_gpu_bwd.fits(kp_dim, d_outp, q.dtype.itemsize):
    need = kernel_mosaic_gpu_bwd.smem_bytes(kp_dim, d_outp, q.dtype.itemsize)
    raise ValueError(
      f"GpuConfig(bwd='kernel'): Kp={kp_dim}, d_out={d_outp} need {need} bytes of SMEM"
    )
  hp = _round_up(h, kernel_mosaic_gpu.HEAD_BLOCK)
  qf, kvf, gidx = _fold(q, kv, idx, hp, kp_dim, kernel_mosaic_gpu.BLOCK_K)
  delta = jnp.einsum("bthv,bthv->bth", out.astype(f32), d_out.astype(f32))
  delta = delta - jnp.where(jnp.isfinite(lse), d_lse.astype(f32), 0.0)
  dof = jnp.pad(_pad_heads(d_out.astype(q.dtype), hp), ((0, 0), (0, 0), (0, d_outp - d_v)))
  lsef, deltaf = _pad_heads(lse.astype(f32), hp, jnp.inf), _pad_heads(delta, hp)
  n, rows = qf.shape[0], kvf.shape[0]
  n_blocks = -(-n // block_t)
  interpret = _gpu_interpret(interpret)

  def split(x, fill=0):
    x = _common.pad_axis(x, 0, block_t, value=fill)
    return x.reshape((n_blocks, block_t) + x.shape[1:])

  def body(dkv, blk):
    qb, ib, db, lb, eb = blk
    dq, a, qd = kernel_mosaic_gpu_bwd.sparse_mla_bwd(
      qb, kvf, ib, db, lb, eb, scale=scale, interpret=interpret or False
    )
    drows = jnp.einsum("nhs,nhc->nsc", a, qd, preferred_element_type=jnp.bfloat16)
    order, starts = kernel_segment_sum_triton.sort_segments(ib.reshape(-1), rows)
    dkv = kernel_segment_sum_triton.segment_sum_rows(
      drows.reshape(-1, kp_dim), order, starts, dkv, interpret=bool(interpret)
    )
    return dkv, dq

  xs = (split(qf), split(gidx, -1), split(dof), split(lsef, jnp.inf), split(deltaf))
  dkv, dq = jax.lax.scan(body, jnp.zeros((rows, kp_dim), f32), xs)
  dq = dq.reshape((n_blocks * block_t,) + dq.shape[2:])[:n, :h, :k_dim].reshape(b, t, h, k_dim)
  return dq, dkv[:, :k_dim].reshape(kv.shape).astype(kv.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _sparse_mla_gpu(q, kv, idx, scale, d_v, interpret, config):
  return _gpu_fwd_call(q, kv, idx, scale, d_v, interpret, config)


def _sparse_mla_gpu_fwd(q, kv, idx, scale, d_v, interpret, config):
  out, lse = _gpu_fwd_call(q, kv, idx, scale, d_v, interpret, config)
  out, lse = _common.saved(out, _common.SAVED_OUT), _common.saved(lse)
  return (out, lse), (q, kv, idx, out, lse)


def _sparse_mla_gpu_bwd(scale, d_v, interpret, config, res, cts):
  dq, dkv = _gpu_bwd_call(*res, *cts, scale, d_v, config, bool(interpret))
  return dq, dkv, None


_sparse_mla_gpu.defvjp(_sparse_mla_gpu_fwd, _sparse_mla_gpu_bwd)
