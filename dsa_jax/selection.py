# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Positional selections S_t with the indexer's budget k: the controls of issue 21.

They choose keys from the query's position alone (no scores), in `indexer.select_topk`'s layout,
so the same sparse MLA path attends over them (mla.ATTENTION_MODES "window", "random",
"random_local"; the kernels are unchanged):
- `window`: the last k keys, positions p-k+1 .. p (a sliding window of the same budget);
- `random`: k keys spread at random over the visible prefix [0, p]: [0, p] is cut into k equal
  strata and one key is drawn uniformly in each. Every visible key is selected with probability
  ~k/(p+1), as in a uniform k-subset, with no duplicates and O(k) work per query. The draw is a
  hash of (seed, p, slot): the same in every batch row, layer, call shape and training step;
- `random_local`: the last k//2 keys plus k - k//2 drawn as in `random` over the keys before them.

Layout: idx [..., k] int32, k_eff = min(k, p + 1) valid slots in ascending key order, then -1
(for p + 1 <= k every mode selects all of [0, p]). Causal by construction. Arithmetic in uint32:
k·(p+1) < 2^32.
"""

from __future__ import annotations

import jax.numpy as jnp

MODES = ("window", "random", "random_local")


def _mix(x):
  """lowbias32 integer hash (uint32 -> uint32)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def window(pos, k: int):
  """The last k keys of each query position. pos [...] int -> idx [..., k] int32."""
  pos = jnp.asarray(pos, jnp.int32)[..., None]
  idx = jnp.maximum(pos - k + 1, 0) + jnp.arange(k, dtype=jnp.int32)
  return jnp.where(idx <= pos, idx, -1)


def random(pos, k: int, *, seed: int = 0, n_local: int = 0):
  """k keys per query position: the last n_local, and k - n_local drawn one per stratum of the
  keys before them (module docstring). pos [...] int -> idx [..., k] int32."""
  if not 0 <= n_local < k:
    raise ValueError(f"n_local={n_local} must be in [0, k={k})")
  pos = jnp.asarray(pos, jnp.int32)[..., None]
  r = k - n_local
  m = jnp.maximum(pos + 1 - n_local, r).astype(jnp.uint32)  # keys [0, m) to draw from (m > r)
  i = jnp.arange(r, dtype=jnp.uint32)
  lo, hi = i * m // r, (i + 1) * m // r  # stratum i: [lo, hi), nonempty since m >= r
  h = _mix(_mix(jnp.uint32(seed) * jnp.uint32(0x9E3779B9) + pos.astype(jnp.uint32)) ^ _mix(i))
  drawn = (lo + h % (hi - lo)).astype(jnp.int32)
  local = pos - n_local + 1 + jnp.arange(n_local, dtype=jnp.int32)
  idx = jnp.concatenate([jnp.broadcast_to(drawn, pos.shape[:-1] + (r,)), local], axis=-1)
  return jnp.where(pos + 1 <= k, window(pos[..., 0], k), idx)


def at_positions(mode: str, pos, k: int, *, seed: int = 0):
  """The selection of `mode` (one of MODES) for query positions pos [...] -> idx [..., k]."""
  if mode == "window":
    return window(pos, k)
  if mode == "random":
    return random(pos, k, seed=seed)
  if mode == "random_local":
    return random(pos, k, seed=seed, n_local=k // 2)
  raise ValueError(f"selection mode={mode!r}; expected one of {MODES}")


def select(mode: str, b: int, t: int, s: int, k: int, *, seed: int = 0):
  """idx [B,T,k] for T queries that are the last T of S keys (query t at position S - T + t)."""
  idx = at_positions(mode, jnp.arange(s - t, s, dtype=jnp.int32), k, seed=seed)
  return jnp.broadcast_to(idx[None], (b, t, k))
