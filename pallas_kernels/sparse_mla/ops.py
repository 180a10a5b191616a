# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Public sparse-MLA ops: shape validation and the impl switch ("reference" | "pallas")."""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels.sparse_mla import kernel, kernel_tpu, kernel_triton, reference

IMPLS = ("reference", "pallas")
BACKENDS = ("gpu", "tpu")
TRITON_BWDS = ("xla", "xla_fused", "triton", "hybrid", "hybrid_xla")


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Knobs of the Triton GPU variants (hashable: a static argument).

  fwd: forward kernel tiling. bwd: "xla" (ops._bwd_blocked), "xla_fused" (the same with the
  logits and dP in one matmul and the dkv rows in one), "triton" (head-block kernel with dkv
  atomics), "hybrid" (Triton dq + dS/P kernel, then the Triton dkv kernel: one atomic per slot and
  column over all heads), "hybrid_xla" (Triton dq + dS/P kernel, dkv by XLA matmul + scatter-add).
  xla_block_t: query tokens per scan step of the XLA backward parts (summed over the batch in
  the blocked backward); xla_bf16_updates: dkv rows rounded to bf16 before the f32 scatter-add
  (half the scatter's update traffic).
  sort_idx: sort each token's slots (same result; gathers walk kv in address order).
  """

  fwd: kernel_triton.BlockSizes = kernel_triton.BlockSizes()
  bwd: str = "xla"
  bwd_bs: kernel_triton.BwdBlockSizes = kernel_triton.BwdBlockSizes()
  dkv_bs: kernel_triton.DkvBlockSizes = kernel_triton.DkvBlockSizes()
  xla_block_t: int = 64
  xla_bf16_updates: bool = False
  sort_idx: bool = False

  def __post_init__(self):
    if self.bwd not in TRITON_BWDS:
      raise ValueError(f"bwd={self.bwd!r}; expected one of {TRITON_BWDS}")


TRITON_VARIANTS = {
  "triton": TritonConfig(bwd="triton"),
  "triton_xla_bwd": TritonConfig(),
  # Fastest measured on H200 (sweeps 2026-11-29, experiments/results/sweep_sparse_mla*.json):
  # forward with the accumulator in 4 column tiles and 3 stages (236 vs 213 TFLOP/s), backward
  # with fused matmuls, bf16 dkv rows and 512-token scan steps (151; 128-token steps 146, the
  # unfused 64-token backward 101). A 512-token step holds ~1.2 GB of gathered rows per batch row.
  "triton_xla_fused_bwd": TritonConfig(
    fwd=kernel_triton.BlockSizes(value_split=4, num_stages=3),
    bwd="xla_fused",
    xla_block_t=512,
    xla_bf16_updates=True,
  ),
  "triton_relaxed_bwd": TritonConfig(
    bwd="triton", bwd_bs=kernel_triton.BwdBlockSizes(relaxed_atomics=True)
  ),
  "triton_hybrid_bwd": TritonConfig(bwd="hybrid"),
  "triton_hybrid_xla_bwd": TritonConfig(bwd="hybrid_xla", xla_block_t=256),
}
# "mosaic_ws" (the default): the warp-specialised Mosaic GPU forward (kernel.sparse_mla_fwd_ws)
# with TRITON_DEFAULT_VARIANT's backward (Triton dq + XLA dkv).
GPU_VARIANTS = (*TRITON_VARIANTS, "mosaic", "mosaic_ws")
GPU_DEFAULT_VARIANT = "mosaic_ws"
TRITON_DEFAULT_VARIANT = "triton_xla_fused_bwd"  # the Triton variant a triton_config applies to


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


def _check_pallas(q, kv):
  if q.dtype != kv.dtype or q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"impl='pallas' needs q and kv both bf16 or f16, got {q.dtype}, {kv.dtype}")


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
  variant: str | None = None,
  triton_config: TritonConfig | None = None,
  ws_config: kernel.WsBlockSizes | None = None,
):
  """out [B,T,H,V], lse [B,T,H] = softmax(scale·q·kv[idx]) · kv[idx][:d_v]. See reference.py.

  impl="pallas" runs the Mosaic GPU forward kernel (kernel.py) under a custom VJP whose backward
  honours both cotangents (out and lse). `interpret`: True or plgpu.InterpretGPUParams() runs the
  kernel in the GPU interpreter (CPU tests).
  backend ("gpu" | "tpu"; default: "tpu" when jax.default_backend() is "tpu", else "gpu") picks
  the kernels: "tpu" runs kernel_tpu.py (Mosaic TPU forward and backward kernels); there
  interpret=True means pltpu.InterpretParams().
  variant (GPU only; default GPU_DEFAULT_VARIANT = "mosaic_ws", the warp-specialised Mosaic GPU
  forward + TRITON_DEFAULT_VARIANT's backward; TRITON_DEFAULT_VARIANT when only triton_config is
  given): "triton" = Triton-backend forward and backward
  kernels (kernel_triton.py); "triton_xla_bwd" = Triton forward + the blocked XLA backward;
  "mosaic" = the Mosaic GPU forward (kernel.py) + the blocked XLA backward; the other
  "triton_*" names are TRITON_VARIANTS (Triton forward + another backward, see TritonConfig).
  triton_config: overrides the Triton variant's TritonConfig (tuning sweeps).
  ws_config: kernel.WsBlockSizes of the "mosaic_ws" forward (default WsBlockSizes()).
  """
  _check(q, kv, idx, d_v)
  if impl == "reference":
    return reference.sparse_mla_reference(q, kv, idx, scale=scale, d_v=d_v)
  if impl == "pallas":
    backend = backend or ("tpu" if jax.default_backend() == "tpu" else "gpu")
    if backend not in BACKENDS:
      raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    if backend == "tpu":
      if q.dtype != kv.dtype or q.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"TPU kernels need q and kv both bf16 or f32, got {q.dtype}, {kv.dtype}")
      if interpret is True:
        from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

        interpret = pltpu.InterpretParams()
      bs = kernel_tpu.BlockSizes.default_for(idx.shape[-1])
      return kernel_tpu.sparse_mla_tpu(
        q, kv, idx.astype(jnp.int32), float(scale), int(d_v), bs, interpret or False
      )
    _check_pallas(q, kv)
    variant = variant or (TRITON_DEFAULT_VARIANT if triton_config else GPU_DEFAULT_VARIANT)
    if variant not in GPU_VARIANTS:
      raise ValueError(f"variant={variant!r}; expected one of {GPU_VARIANTS}")
    if variant.startswith("mosaic") and triton_config is not None:
      raise ValueError(f"triton_config needs a Triton variant, got variant={variant!r}")
    if variant.startswith("mosaic") and interpret is True:
      from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

      interpret = plgpu.InterpretGPUParams()
    if variant == "mosaic_ws":
      cfg = TRITON_VARIANTS[TRITON_DEFAULT_VARIANT]
      return _sparse_mla_ws(
        q, kv, idx.astype(jnp.int32), float(scale), int(d_v), interpret or False, ws_config, cfg
      )
    if variant != "mosaic":
      cfg = triton_config or TRITON_VARIANTS[variant]
      idx = idx.astype(jnp.int32)
      if cfg.sort_idx:
        idx = jnp.sort(idx, axis=-1)
      return _sparse_mla_triton(q, kv, idx, float(scale), int(d_v), bool(interpret), cfg)
    return _sparse_mla(q, kv, idx.astype(jnp.int32), float(scale), int(d_v), interpret or False)
  raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")


def sparse_mla_probs(q, kv, idx, lse, *, scale: float, impl: str = "reference", interpret=False):
  """Head-mean attention probabilities at the selected slots [B,T,k] (sparse KL target)."""
  _check(q, kv, idx, kv.shape[-1])
  if impl in ("reference", "pallas"):
    return reference.sparse_mla_probs_reference(q, kv, idx, lse, scale=scale)
  raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")


# ---------------------------------------------------------------------------------------------
# impl="pallas"


def _round_up(x, m):
  return -(-x // m) * m


def _fold(q, kv, idx, hp, d, block_k):
  """The kernels' flat layout: batch folded into rows (slot ids offset by b*S, invalid -> -1),
  heads padded to hp, the feature dim to d and the slots to a multiple of block_k."""
  b, t, h, k_dim = q.shape
  s = kv.shape[1]
  qf = jnp.pad(q, ((0, 0), (0, 0), (0, hp - h), (0, d - k_dim))).reshape(b * t, hp, d)
  kvf = jnp.pad(kv, ((0, 0), (0, 0), (0, d - k_dim))).reshape(b * s, d)
  valid = (idx >= 0) & (idx < s)
  gidx = jnp.where(valid, idx + (jnp.arange(b, dtype=jnp.int32) * s)[:, None, None], -1)
  gidx = _common.pad_axis(gidx.reshape(b * t, -1), 1, block_k, value=-1)
  return qf, kvf, gidx


def _fwd_kernel_call(q, kv, idx, scale, d_v, interpret):
  """Folds batch into rows, pads to the kernel's granules, runs it, and un-pads."""
  b, t, h, k_dim = q.shape
  kp_dim = _round_up(k_dim, 64)
  hp = _round_up(h, kernel.HEAD_BLOCK)
  dv_pad = _round_up(d_v, 64)
  bv = max(c for c in range(64, 257, 64) if dv_pad % c == 0)
  bs = kernel.BlockSizes(block_k=64, block_v=bv)
  qf, kvf, gidx = _fold(q, kv, idx, hp, kp_dim, bs.block_k)
  out, lse = kernel.sparse_mla_fwd_flat(
    qf, kvf, gidx, scale=scale, n_v=dv_pad // bv, bs=bs, interpret=interpret
  )
  out = out[:, :h, :d_v].reshape(b, t, h, d_v)
  return out, lse[:, :h].reshape(b, t, h)


def _bwd_blocked(
  q, kv, idx, out, lse, d_out, d_lse, *, scale, d_v, block_t=64, update_dtype=None, fused=False
):
  """dq, dkv from the saved lse (no softmax renormalisation), query blocks scanned in XLA.

  With P = exp(scale·q·kᵀ - lse): dS = P ⊙ (dO·Vᵀ - Δ + dlse), Δ = rowsum(O ⊙ dO);
  dq = scale·dS·K; dK_rows = scale·dSᵀ·q (+ Pᵀ·dO on the value dims), scatter-added into dkv
  (duplicates across queries add up; invalid slots are dropped).
  update_dtype: dK_rows rounded to it before the f32 scatter-add (less scatter traffic).
  fused: [q; dO] stacked on the head axis, so the logits and dP are one matmul over the gathered
  rows ([2h, K] x [K, k]) and the dK_rows one more ([dS; P]ᵀ x [q; dO], contraction 2h).
  """
  b, t, h, k_dim = q.shape
  s = kv.shape[1]
  delta = jnp.einsum("bthv,bthv->bth", out.astype(jnp.float32), d_out.astype(jnp.float32))
  d_lse = jnp.where(jnp.isfinite(lse), d_lse, 0.0)
  n = -(-t // block_t)

  def split(x, fill=0):
    x = _common.pad_axis(x, 1, block_t, value=fill)
    return jnp.moveaxis(x.reshape((b, n, block_t) + x.shape[2:]), 1, 0)

  xs = (split(q), split(idx, -1), split(lse, jnp.inf), split(d_out), split(delta), split(d_lse))

  f32 = jnp.float32

  def body(dkv, blk):
    qb, ib, lb, dob, deb, dlb = blk
    valid = (ib >= 0) & (ib < s)
    safe = jnp.where(valid, ib, 0)
    rows = jax.vmap(lambda kv_b, i_b: kv_b[i_b])(kv, safe)  # [b,tb,k,K]
    if fused:
      qd = jnp.concatenate([qb, jnp.pad(dob, ((0, 0),) * 3 + ((0, k_dim - d_v),))], axis=2)
      sd = jnp.einsum("bthc,btsc->bths", qd, rows, preferred_element_type=f32)
      logits, dp = sd[:, :, :h] * scale, sd[:, :, h:]
    else:
      logits = jnp.einsum("bthc,btsc->bths", qb, rows, preferred_element_type=f32) * scale
    p = jnp.where(valid[:, :, None, :], jnp.exp(logits - lb[..., None]), 0.0)
    if not fused:
      dp = jnp.einsum("bthv,btsv->bths", dob, rows[..., :d_v], preferred_element_type=f32)
    ds = p * (dp - deb[..., None] + dlb[..., None])
    dq = scale * jnp.einsum(
      "bths,btsc->bthc", ds.astype(kv.dtype), rows, preferred_element_type=f32
    )
    if fused:
      a = jnp.concatenate([(ds * scale).astype(q.dtype), p.astype(q.dtype)], axis=2)
      drows = jnp.einsum("bths,bthc->btsc", a, qd, preferred_element_type=update_dtype or f32)
    else:
      drows = scale * jnp.einsum(
        "bths,bthc->btsc", ds.astype(q.dtype), qb, preferred_element_type=f32
      )
      dv = jnp.einsum("bths,bthv->btsv", p.astype(d_out.dtype), dob, preferred_element_type=f32)
      drows = drows.at[..., :d_v].add(dv)
      if update_dtype is not None:
        drows = drows.astype(update_dtype)
    scatter_idx = jnp.where(valid, ib, s)  # out of range -> dropped
    dkv = jax.vmap(
      lambda a, i, u: a.at[i.reshape(-1)].add(u.reshape(-1, k_dim).astype(f32), mode="drop")
    )(dkv, scatter_idx, drows)
    return dkv, dq.astype(q.dtype)

  dkv, dq = jax.lax.scan(body, jnp.zeros(kv.shape, jnp.float32), xs)
  dq = jnp.moveaxis(dq, 0, 1).reshape(b, n * block_t, h, k_dim)[:, :t]
  return dq, dkv.astype(kv.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _sparse_mla(q, kv, idx, scale, d_v, interpret):
  return _fwd_kernel_call(q, kv, idx, scale, d_v, interpret)


def _sparse_mla_fwd(q, kv, idx, scale, d_v, interpret):
  out, lse = _fwd_kernel_call(q, kv, idx, scale, d_v, interpret)
  return (out, lse), (q, kv, idx, out, lse)


def _sparse_mla_bwd(scale, d_v, interpret, res, cts):
  del interpret
  q, kv, idx, out, lse = res
  d_out, d_lse = cts
  dq, dkv = _bwd_blocked(q, kv, idx, out, lse, d_out, d_lse, scale=scale, d_v=d_v)
  return dq, dkv, None


_sparse_mla.defvjp(_sparse_mla_fwd, _sparse_mla_bwd)


# ---------------------------------------------------------------------------------------------
# GPU variants "triton" / "triton_xla_bwd": Triton-backend kernels (kernel_triton.py)


def _triton_flat(q, kv, idx, d_v, block_h, block_k):
  """Folds batch into rows and pads heads / feature dims / slots to the kernels' granules."""
  da, db = kernel_triton.split_dims(q.shape[-1], d_v)
  hp = _round_up(q.shape[2], block_h)
  return (*_fold(q, kv, idx, hp, da + db, block_k), da, db, hp)


def _fit_heads(bs, h):
  """Fewer heads than block_h: shrink the program's head block (Triton dots need M >= 16) so a
  small model does not pay for padded heads."""
  bh = max(16, 1 << (h - 1).bit_length())
  return dataclasses.replace(bs, block_h=bh) if bh < bs.block_h else bs


def _triton_fwd_call(q, kv, idx, scale, d_v, interpret, cfg):
  b, t, h, _ = q.shape
  bs = _fit_heads(cfg.fwd, h)
  qf, kvf, gidx, da, db, _ = _triton_flat(q, kv, idx, d_v, bs.block_h, bs.block_k)
  out, lse = kernel_triton.sparse_mla_fwd_triton(
    qf, kvf, gidx, scale=scale, da=da, db=db, bs=bs, interpret=interpret
  )
  return out[:, :h, :d_v].reshape(b, t, h, d_v), lse[:, :h].reshape(b, t, h)


def _triton_bwd_call(q, kv, idx, out, lse, d_out, d_lse, scale, d_v, interpret, cfg):
  """The "triton", "hybrid" and "hybrid_xla" backwards on the flat kernel layout."""
  b, t, h, k_dim = q.shape
  s = kv.shape[1]
  bs = _fit_heads(cfg.bwd_bs, h)
  qf, kvf, gidx, da, db, hp = _triton_flat(q, kv, idx, d_v, bs.block_h, bs.block_k)
  delta = jnp.einsum("bthv,bthv->bth", out.astype(jnp.float32), d_out.astype(jnp.float32))
  d_lse = jnp.where(jnp.isfinite(lse), d_lse, 0.0)

  def heads(x, fill=0.0):  # [B,T,H] -> [B*T,Hp]
    return jnp.pad(x.reshape(b * t, h), ((0, 0), (0, hp - h)), constant_values=fill)

  dof = jnp.pad(d_out, ((0, 0), (0, 0), (0, hp - h), (0, da - d_v))).reshape(b * t, hp, da)
  args = (qf, kvf, gidx, dof, heads(lse, jnp.inf), heads(delta), heads(d_lse))
  kw = dict(scale=scale, da=da, db=db, bs=bs, interpret=interpret)
  if cfg.bwd == "triton":
    dq, dkv = kernel_triton.sparse_mla_bwd_triton(*args, **kw)
  else:
    dq, dsp = kernel_triton.sparse_mla_bwd_dq_triton(*args, **kw)
    if cfg.bwd == "hybrid":
      dkv = kernel_triton.sparse_mla_dkv_triton(
        dsp, qf, dof, gidx, r=b * s, da=da, db=db, bs=cfg.dkv_bs, interpret=interpret
      )
    else:
      upd = jnp.bfloat16 if cfg.xla_bf16_updates else None
      dkv = _dkv_xla(dsp, qf, dof, gidx, b * s, cfg.xla_block_t, upd)
  dq = dq[:, :h, :k_dim].reshape(b, t, h, k_dim)
  return dq, dkv[:, :k_dim].reshape(b, s, k_dim).astype(kv.dtype)


def _dkv_xla(dsp, qf, dof, gidx, r, block_t, update_dtype):
  """dkv [r, D] f32 from the Triton dS/P slots: per token [dS; P]ᵀ·[q; dO] (contraction over
  2·Hp) then a scatter-add of the rows, scanned over blocks of block_t tokens."""
  n, _, hp, kp = dsp.shape
  d = qf.shape[-1]
  dst = jnp.where(gidx >= 0, gidx, r)  # invalid -> out of range -> dropped
  bt = min(block_t, n)
  nb = -(-n // bt)

  def split(x, fill=0):
    x = _common.pad_axis(x, 0, bt, value=fill)
    return x.reshape((nb, bt) + x.shape[1:])

  xs = (split(dsp), split(qf), split(dof), split(dst, r))

  def body(dkv, blk):
    a, qb, dob, ib = blk
    bm = jnp.concatenate([qb, jnp.pad(dob, ((0, 0), (0, 0), (0, d - dob.shape[-1])))], axis=1)
    drows = jnp.einsum(
      "tks,tkc->tsc",
      a.reshape(bt, 2 * hp, kp),
      bm,
      preferred_element_type=update_dtype or jnp.float32,
    )
    upd = drows.reshape(-1, d).astype(jnp.float32)
    return dkv.at[ib.reshape(-1)].add(upd, mode="drop"), None

  dkv, _ = jax.lax.scan(body, jnp.zeros((r, d), jnp.float32), xs)
  return dkv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _sparse_mla_triton(q, kv, idx, scale, d_v, interpret, cfg):
  return _triton_fwd_call(q, kv, idx, scale, d_v, interpret, cfg)


def _sparse_mla_triton_fwd(q, kv, idx, scale, d_v, interpret, cfg):
  out, lse = _triton_fwd_call(q, kv, idx, scale, d_v, interpret, cfg)
  return (out, lse), (q, kv, idx, out, lse)


def _sparse_mla_triton_bwd(scale, d_v, interpret, cfg, res, cts):
  q, kv, idx, out, lse = res
  d_out, d_lse = cts
  if cfg.bwd in ("xla", "xla_fused"):
    dq, dkv = _bwd_blocked(
      q,
      kv,
      idx,
      out,
      lse,
      d_out,
      d_lse,
      scale=scale,
      d_v=d_v,
      # Scan steps cover xla_block_t tokens summed over the batch (the gathered rows of one
      # step scale with b * block_t), so a larger batch takes shorter steps, not more memory.
      block_t=max(1, cfg.xla_block_t // q.shape[0]),
      update_dtype=jnp.bfloat16 if cfg.xla_bf16_updates else None,
      fused=cfg.bwd == "xla_fused",
    )
  else:
    dq, dkv = _triton_bwd_call(q, kv, idx, out, lse, d_out, d_lse, scale, d_v, interpret, cfg)
  return dq, dkv, None


_sparse_mla_triton.defvjp(_sparse_mla_triton_fwd, _sparse_mla_triton_bwd)


# ---------------------------------------------------------------------------------------------
# GPU variant "mosaic_ws": warp-specialised Mosaic GPU forward + the default variant's backward


def _ws_fwd_call(q, kv, idx, scale, d_v, interpret, bs):
  b, t, h, k_dim = q.shape
  d_out = _round_up(d_v, 128)
  kp_dim = _round_up(max(k_dim, d_out), 64)
  bs = bs or kernel.WsBlockSizes()
  if bs.pairs and kp_dim - d_out < 64:  # no rope tile to hold the P tiles
    bs = dataclasses.replace(bs, pairs=False)
  block_k = kernel.WS_BLOCK_K * (2 if bs.pairs else 1)  # pairs: chunks come in pairs
  qf, kvf, gidx = _fold(q, kv, idx, _round_up(h, kernel.HEAD_BLOCK), kp_dim, block_k)
  if interpret and bs.lane_copies:  # inline Mosaic GPU has no interpreter: Pallas copies there
    bs = dataclasses.replace(bs, lane_copies=False)
  if bs.idx_in_smem:
    need = kernel.ws_smem_bytes(kp_dim, gidx.shape[1], q.dtype.itemsize, True)
    if need > kernel._SMEM_BYTES:  # long top-k rows: slot ids from GMEM, Pallas row copies
      bs = dataclasses.replace(bs, idx_in_smem=False, lane_copies=False, direct=False, pairs=False)
  out, lse = kernel.sparse_mla_fwd_ws(
    qf, kvf, gidx, scale=scale, d_out=d_out, bs=bs, interpret=interpret
  )
  return out[:, :h, :d_v].reshape(b, t, h, d_v), lse[:, :h].reshape(b, t, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _sparse_mla_ws(q, kv, idx, scale, d_v, interpret, bs, cfg):
  return _ws_fwd_call(q, kv, idx, scale, d_v, interpret, bs)


def _sparse_mla_ws_fwd(q, kv, idx, scale, d_v, interpret, bs, cfg):
  out, lse = _ws_fwd_call(q, kv, idx, scale, d_v, interpret, bs)
  return (out, lse), (q, kv, idx, out, lse)


def _sparse_mla_ws_bwd(scale, d_v, interpret, bs, cfg, res, cts):
  del bs
  return _sparse_mla_triton_bwd(scale, d_v, interpret, cfg, res, cts)


_sparse_mla_ws.defvjp(_sparse_mla_ws_fwd, _sparse_mla_ws_bwd)
