# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""TPU top-k for the indexer scores: XLA's TPU-optimised approximate top-k, or the exact sort.

Selection runs outside the logits kernel, on scores in HBM (docs/architecture.md §Kernels; why:
lab log 2026-12-05): `jax.lax.approx_max_k` (arXiv 2206.14286) with `recall_target` (e.g. 0.95,
the expected fraction of the true top-k it returns), or with None the exact path (`lax.top_k`,
sort-based on TPU; on CPU approx_max_k also falls back to an exact sort, so its recall there is 1).

Output matches topk/reference.py's conventions: [..., k] int32, slots in descending score order,
-1 for -inf (masked) entries and for k > S.
"""

import jax
import jax.numpy as jnp


def topk_tpu(scores, k: int, *, recall_target: float | None = None):
  """scores [..., S] float (-inf = masked) -> idx [..., k] int32 (-1 = no key)."""
  if k <= 0:
    raise ValueError(f"k={k} must be positive")
  if recall_target is not None and not 0.0 < recall_target <= 1.0:
    raise ValueError(f"recall_target={recall_target} must be in (0, 1]")
  s = scores.shape[-1]
  kk = min(k, s)
  x = scores.astype(jnp.float32)
  if recall_target is None:
    vals, idx = jax.lax.top_k(x, kk)
  else:
    vals, idx = jax.lax.approx_max_k(x, kk, recall_target=recall_target)
  idx = jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)
  if kk < k:
    idx = jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, k - kk)], constant_values=-1)
  return idx
