# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Public top-k op with the impl switch."""

import jax
import jax.numpy as jnp

from pallas_kernels.topk import kernel_tpu, kernel_triton, reference

IMPLS = ("reference", "pallas")
BACKENDS = ("gpu", "tpu")


def topk(
  scores,
  k: int,
  *,
  impl: str = "reference",
  interpret=False,
  block_sizes=None,
  backend: str | None = None,
  recall_target: float | None = None,
):
  """Exact top-k indices of the last axis; -inf entries -> -1; ties to the lower index.

  impl="reference": lax.top_k, slots in descending score order.
  impl="pallas": threshold select (kernel_triton.py), the same index set with slots in ascending
  index order (-1 slots last). NaN scores are treated as masked. interpret=True runs it on CPU.
  impl="pallas" with backend="tpu" (default on a TPU host): kernel_tpu.topk_tpu, i.e. exact
  lax.top_k (recall_target=None) or lax.approx_max_k(recall_target); descending score order.
  """
  if k <= 0:
    raise ValueError(f"k={k} must be positive")
  if impl == "reference":
    return reference.topk_reference(scores, k)
  if impl != "pallas":
    raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
  backend = backend or ("tpu" if jax.default_backend() == "tpu" else "gpu")
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
  if backend == "tpu":
    return kernel_tpu.topk_tpu(scores, k, recall_target=recall_target)
  if scores.ndim < 1 or scores.shape[-1] == 0:
    raise ValueError(f"scores must have a non-empty last axis; got shape {scores.shape}")
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    raise ValueError(f"scores must be floating point; got {scores.dtype}")
  lead, s = scores.shape[:-1], scores.shape[-1]
  rows = scores.reshape(-1, s).astype(jnp.float32)
  lengths = jnp.full((rows.shape[0],), s, jnp.int32)
  idx = kernel_triton.select_topk(
    rows,
    lengths,
    k=k,
    block_sizes=block_sizes or kernel_triton.BlockSizes.default_for(s),
    interpret=interpret,
  )
  return idx.reshape(lead + (k,))
