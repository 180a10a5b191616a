# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Reference top-k selection: `lax.top_k` (a full sort on GPU), the spec for the select kernels.

Ties are broken by the lower index (lax.top_k's documented order). Entries equal to -inf are
masked keys: their slots come back as -1, so a row with fewer than k valid keys is padded with -1
(the fixed-width convention of FlashMLA/DeepGEMM, docs/dsa.md §Top-k).
"""

import jax
import jax.numpy as jnp


def topk_reference(scores, k: int):
  """scores [..., S] float (-inf = masked) -> idx [..., k] int32 in descending score order."""
  s = scores.shape[-1]
  kk = min(k, s)
  vals, idx = jax.lax.top_k(scores, kk)
  idx = jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)
  if kk < k:
    pad = [(0, 0)] * (idx.ndim - 1) + [(0, k - kk)]
    idx = jnp.pad(idx, pad, constant_values=-1)
  return idx
