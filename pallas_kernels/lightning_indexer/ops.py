# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Public lightning-indexer ops (logits, fused causal top-k, KL losses) with the impl switch.

impl="pallas" (GPU: Mosaic GPU FP8 logits + threshold-select top-k; interpret=True runs the same
kernels on CPU) takes the same float q, k, w as the reference. q and k are re-quantised inside with
the 1x128 e4m3 / ue8m0 scheme of docs/dsa.md §Indexer, which is exact for tensors that
already went through that fake quant, so logits match the reference to fp32 summation order and
top-k selections match up to near-ties. Its kernels need J=64 heads and D=128.
The KL ops' impl="pallas" is a custom_vjp with streamed hand-written backward passes (grad.py);
dense_kl on a GPU backend (or with interpret=True) runs the Pallas-Triton kernels of
kernel_kl_triton.py instead, and the XLA grad.py version where they cannot run (CPU without
interpret, TPU) or do not take the shape (kernel_kl_triton.supported); sparse_kl likewise runs the
Pallas-Triton kernels of kernel_sparse_kl_triton.py (SPARSE_KL_KERNELS_BY_DEFAULT).
"""

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels.lightning_indexer import (
  grad,
  kernel_kl_triton,
  kernel_mosaic_gpu,
  kernel_sparse_kl_triton,
  kernel_tpu,
  reference,
)

IMPLS = ("reference", "pallas")
BACKENDS = ("gpu", "tpu")
# The GPU top-k scores each query block into a [B, block, keys] f32 buffer with a grid of
# block / block_q CTAs (16 queries each) per batch row, one block after another: a block of a few
# hundred queries occupies a fraction of a GPU's SMs. So the blocks are at least GPU_TOPK_BLOCK_T
# queries (4096 -> 256 CTAs), as long as the logits buffer stays within GPU_TOPK_LOGITS_BYTES.
GPU_TOPK_BLOCK_T = 4096
GPU_TOPK_LOGITS_BYTES = 1 << 31


def gpu_topk_block(t: int, keys: int, batch: int, block_t: int, multiple: int = 16) -> int:
  """Queries per block of the GPU top-k for T = t queries over `keys` keys: at least block_t
  (the caller's) and, where T allows, GPU_TOPK_BLOCK_T, with the [batch, block, keys] f32 logits
  within GPU_TOPK_LOGITS_BYTES (never below block_t); a multiple of `multiple`, at most T
  rounded up to it."""
  cap = GPU_TOPK_LOGITS_BYTES // (4 * max(batch, 1) * max(keys, 1))
  want = max(block_t, min(GPU_TOPK_BLOCK_T, cap))
  up = lambda x: -(-x // multiple) * multiple
  return min(up(want), up(t))


def _check(q, k, w):
  if q.ndim != 4 or k.ndim != 3 or w.ndim != 3:
    raise ValueError(
      f"expected q [B,T,J,D], k [B,S,D], w [B,T,J]; got {q.shape}, {k.shape}, {w.shape}"
    )
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"q head dim {q.shape[-1]} != k dim {k.shape[-1]}")
  if w.shape != q.shape[:3]:
    raise ValueError(f"w shape {w.shape} must be q.shape[:3]={q.shape[:3]}")
  if q.shape[1] > k.shape[1]:
    raise ValueError(f"T={q.shape[1]} queries exceed S={k.shape[1]} keys")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"batch of q {q.shape[0]} != batch of k {k.shape[0]}")


def _impl(impl):
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
  return impl == "pallas"


def _check_fp8_kernel(q, k, block_q: int, block_k: int):
  _, t, j, d = q.shape
  s = k.shape[1]
  if j != kernel_mosaic_gpu.HEADS or d != kernel_mosaic_gpu.DIM:
    raise ValueError(
      f"impl='pallas' needs J={kernel_mosaic_gpu.HEADS} heads and D={kernel_mosaic_gpu.DIM}; got J={j}, "
      f"D={d} (use impl='reference')"
    )
  if t % block_q:
    raise ValueError(f"impl='pallas' needs T={t} divisible by block_q={block_q}")
  if s % block_k:
    raise ValueError(f"impl='pallas' needs S={s} divisible by block_k={block_k}")


def _interp(interpret):
  if not interpret:
    return None
  from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

  return plgpu.InterpretGPUParams() if interpret is True else interpret


def _backend(backend):
  """ "gpu" | "tpu"; default "tpu" when jax.default_backend() is "tpu", else "gpu"."""
  backend = backend or ("tpu" if jax.default_backend() == "tpu" else "gpu")
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
  return backend


def _interp_tpu(interpret):
  if not interpret:
    return False
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

  return pltpu.InterpretParams() if interpret is True else interpret


def indexer_logits(
  q,
  k,
  w,
  *,
  causal: bool = True,
  impl: str = "reference",
  interpret=False,
  block_sizes=None,
  backend: str | None = None,
  numerics: str | None = None,
):
  """I [B,T,S] f32 = Σ_j w·ReLU(q_j·k_s), -inf above the causal diagonal.

  backend="tpu" (kernel_tpu.py; default on a TPU host) takes `numerics` "fp8" | "int8" | "bf16"
  (default: kernel_tpu.default_numerics() for the chip) and kernel_tpu.BlockSizes.
  """
  _check(q, k, w)
  if not _impl(impl):
    return reference.indexer_logits_reference(q, k, w, causal=causal)
  if _backend(backend) == "tpu":
    return kernel_tpu.indexer_logits_tpu(
      q,
      k,
      w,
      numerics=numerics or kernel_tpu.default_numerics(),
      block_sizes=block_sizes,
      causal=causal,
      interpret=_interp_tpu(interpret),
    )
  bs = block_sizes or kernel_mosaic_gpu.BlockSizes.default_for(q.shape[1], k.shape[1])
  _check_fp8_kernel(q, k, bs.block_q, bs.block_k)
  return kernel_mosaic_gpu.indexer_logits_fp8(
    q, k, w, block_sizes=bs, causal=causal, interpret=_interp(interpret)
  )


def indexer_topk(
  q,
  k,
  w,
  *,
  topk: int,
  impl: str = "reference",
  interpret=False,
  block_t=512,
  backend: str | None = None,
  numerics: str | None = None,
  recall_target: float | None = None,
  offset=None,
):
  """Causal top-k key indices [B,T,topk] int32 (-1 = no key), never materialising [T,S].

  offset: global position of query 0 (default S - T); may be traced (a context-parallel shard's
  start). Only the GPU kernel path takes it.

  reference: slots in descending score order; pallas: the same set, slots in ascending key order.
  backend="tpu": the TPU logits kernel (`numerics`, see indexer_logits) per query block, then
  exact lax.top_k (recall_target=None) or lax.approx_max_k(recall_target); descending order.
  """
  _check(q, k, w)
  if topk <= 0:
    raise ValueError(f"topk={topk} must be positive")
  if offset is not None and not (_impl(impl) and _backend(backend) == "gpu"):
    raise ValueError(f"offset is only taken by impl='pallas' on GPU; got impl={impl!r}")
  if not _impl(impl):
    return reference.indexer_topk_reference(q, k, w, topk=topk, block_t=block_t)
  if _backend(backend) == "tpu":
    q, k, w = jax.lax.stop_gradient((q, k, w))
    return kernel_tpu.indexer_topk_tpu(
      q,
      k,
      w,
      topk=topk,
      block_t=min(block_t, q.shape[1]),
      numerics=numerics or kernel_tpu.default_numerics(),
      recall_target=recall_target,
      interpret=_interp_tpu(interpret),
    )
  from pallas_kernels.topk import kernel_triton as topk_kernel  # noqa: PLC0415

  bt = min(gpu_topk_block(q.shape[1], k.shape[1], q.shape[0], block_t), q.shape[1])
  lbs = kernel_mosaic_gpu.BlockSizes.default_for(bt, k.shape[1])
  _check_fp8_kernel(q, k, lbs.block_q, lbs.block_k)
  if bt % lbs.block_q:
    raise ValueError(f"block_t={bt} must be a multiple of {lbs.block_q}")
  q, k, w = jax.lax.stop_gradient((q, k, w))  # indices carry no gradient; kernels have no VJP
  return topk_kernel.indexer_topk_blocked(
    q,
    k,
    w,
    topk=topk,
    block_t=bt,
    logits_block_sizes=lbs,
    interpret=bool(interpret),
    offset=offset,
  )


# One GPU takes the Pallas-Triton sparse-KL kernels (kernel_sparse_kl_triton.py) by default (they
# pass tests/pallas_kernels/test_sparse_kl_kernel.py -m gpu); False keeps the streamed XLA path
# (grad.sparse_kl), and block_sizes= then opts in. M1_SPARSE_KL=xla,kernels measures both.
SPARSE_KL_KERNELS_BY_DEFAULT = True


def sparse_kl_kernels_why(q, k, *, interpret=False, block_sizes=None) -> str | None:
  """None when sparse_kl(impl="pallas") runs the kernels for these arguments, else why not."""
  explicit = bool(interpret) or block_sizes is not None
  why = kernel_sparse_kl_triton.supported(q, k)
  if not interpret and jax.default_backend() != "gpu":
    why = why or f"no GPU (jax.default_backend()={jax.default_backend()!r}); pass interpret=True"
  elif not explicit and not _common.per_device():
    why = why or "several devices outside a shard_map (a pallas_call is not auto-partitioned)"
  elif not explicit and not SPARSE_KL_KERNELS_BY_DEFAULT:
    why = why or "SPARSE_KL_KERNELS_BY_DEFAULT is off: opt in with block_sizes=BlockSizes()"
  return why


def sparse_kl(
  q,
  k,
  w,
  idx,
  p,
  *,
  impl: str = "reference",
  interpret=False,
  block_t=512,
  block_sizes: kernel_sparse_kl_triton.BlockSizes | None = None,
):
  """Sparse-phase indexer KL per query [B,T] (differentiable in q, k, w).

  idx [B,T,k] int32 (-1 or >= S: an invalid slot; ids may repeat), p [B,T,k] the constant target.
  impl="pallas": on one GPU with SPARSE_KL_KERNELS_BY_DEFAULT on, or when asked for (block_sizes,
  or interpret=True to run them on CPU), the Pallas-Triton kernels of kernel_sparse_kl_triton.py;
  elsewhere the streamed XLA custom_vjp of grad.py (block_t). Asking for the kernels with a
  backend or shape they do not take raises.
  """
  _check(q, k, w)
  if idx.shape != p.shape or idx.shape[:2] != q.shape[:2]:
    raise ValueError(f"idx {idx.shape} and p {p.shape} must both be [B,T,k] with B,T={q.shape[:2]}")
  if not _impl(impl):
    return reference.sparse_kl_reference(q, k, w, idx, p)
  why = sparse_kl_kernels_why(q, k, interpret=interpret, block_sizes=block_sizes)
  if why is None:
    return kernel_sparse_kl_triton.sparse_kl(
      q,
      k,
      w,
      idx.astype(jnp.int32),
      p.astype(jnp.float32),
      block_sizes or kernel_sparse_kl_triton.BlockSizes(),
      bool(interpret),
    )
  if interpret or block_sizes is not None:
    raise ValueError(f"sparse_kl kernels requested but not taken: {why}")
  return grad.sparse_kl(q, k, w, idx, p, block_t)


# One GPU takes the Pallas-Triton dense-KL kernels by default (they pass the GPU tests,
# tests/pallas_kernels/test_dense_kl_kernel.py -m gpu); False keeps the streamed XLA path.
# M1 (experiments/bench_train.py, M1_DENSE_KL=xla,kernels) sets it to measure both.
DENSE_KL_KERNELS_BY_DEFAULT = True


def dense_kl(
  q,
  k,
  w,
  attn_q,
  attn_kv,
  attn_lse,
  *,
  attn_scale,
  impl="reference",
  interpret=False,
  block_t=256,
  block_s=2048,
  backend: str | None = None,
  block_sizes: kernel_kl_triton.BlockSizes | None = None,
):
  """Dense warm-up indexer KL per query [B,T] (differentiable in q, k, w).

  attn_lse [B,T,H]: the lse of exactly these logits (attn_scale · attn_q·attn_kvᵀ over each row's
  causal keys), as the attention that ran returns it, or None to compute it. The reference
  L1-normalises the target anyway; the kernels with kernel_kl_triton.GRAD_IN_FORWARD take each
  head's probabilities to sum to 1.
  impl="pallas": on one GPU the Pallas-Triton kernels (kernel_kl_triton.py; `block_sizes` tunes
  them, interpret=True runs them on CPU); elsewhere the streamed XLA custom_vjp of grad.py
  (block_t / block_s). Shapes the kernels do not take: kernel_kl_triton.supported. With several
  devices the kernels run inside a shard_map over the whole mesh (each device its part), or when
  asked for (a pallas_call is not auto-partitioned). Asking for the kernels explicitly (interpret=True or
  block_sizes) with a backend or shape they do not take raises.
  """
  _check(q, k, w)
  if attn_q.ndim != 4 or attn_kv.ndim not in (3, 4):
    raise ValueError(
      f"expected attn_q [B,T,H,C] and attn_kv [B,S,C] or [B,S,H,C]; got {attn_q.shape}, "
      f"{attn_kv.shape}"
    )
  if attn_q.shape[:2] != q.shape[:2] or attn_kv.shape[:2] != k.shape[:2]:
    raise ValueError(
      f"attn_q {attn_q.shape} / attn_kv {attn_kv.shape} must match q {q.shape} / "
      f"k {k.shape} in batch and length"
    )
  if attn_kv.ndim == 4 and attn_kv.shape[2:] != attn_q.shape[2:]:
    raise ValueError(f"MHA-form attn_kv {attn_kv.shape} must match attn_q {attn_q.shape} in H, C")
  if attn_kv.ndim == 3 and attn_kv.shape[-1] != attn_q.shape[-1]:
    raise ValueError(f"absorbed attn_kv {attn_kv.shape} must match attn_q {attn_q.shape} in C")
  if attn_lse is not None and attn_lse.shape != attn_q.shape[:3]:
    raise ValueError(f"attn_lse {attn_lse.shape} must be attn_q.shape[:3]={attn_q.shape[:3]}")
  if not _impl(impl):
    return reference.dense_kl_reference(
      q, k, w, attn_q, attn_kv, attn_lse, attn_scale=attn_scale, block_t=block_t
    )
  explicit = bool(interpret) or block_sizes is not None
  why = kernel_kl_triton.supported(q, attn_q)
  if _backend(backend) != "gpu":
    why = f"backend={_backend(backend)!r} (the kernels are Pallas-Triton, GPU only)"
  elif not interpret and jax.default_backend() != "gpu":
    why = why or f"no GPU (jax.default_backend()={jax.default_backend()!r}); pass interpret=True"
  elif not explicit and not _common.per_device():
    why = why or "several devices outside a shard_map (a pallas_call is not auto-partitioned)"
  elif not explicit and not DENSE_KL_KERNELS_BY_DEFAULT:
    why = why or "DENSE_KL_KERNELS_BY_DEFAULT is off: opt in with block_sizes=BlockSizes()"
  if why is None:
    return kernel_kl_triton.dense_kl(
      q,
      k,
      w,
      attn_q,
      attn_kv,
      attn_lse,
      float(attn_scale),
      block_sizes or kernel_kl_triton.BlockSizes(),
      bool(interpret),
    )
  if explicit:
    raise ValueError(f"dense_kl kernels requested but not taken: {why}")
  return grad.dense_kl(q, k, w, attn_q, attn_kv, attn_lse, float(attn_scale), block_t, block_s)
