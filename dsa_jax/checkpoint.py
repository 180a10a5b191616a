# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Orbax checkpoints: parameter trees (the format converters write) and full training state.

A *params checkpoint* is an Orbax StandardCheckpointer directory holding the pure nested dict of
the model's parameters and router biases (`nnx.to_pure_dict(nnx.state(model))`), keyed by module
path, layer-stacked (leading layer axis in `dense_layers` / `moe_layers`), Linear kernels [in, out].
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


def _flat(tree, prefix=()):
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_flat(v, prefix + (str(k),)))
  else:
    out[prefix] = tree
  return out


def check_tree(got, want, what: str):
  """Raises ValueError listing missing, unexpected and mis-shaped entries of `got` vs `want`."""
  g, w = _flat(got), _flat(want)
  missing = sorted(".".join(k) for k in w.keys() - g.keys())
  extra = sorted(".".join(k) for k in g.keys() - w.keys())
  shapes = sorted(
    f"{'.'.join(k)}: {tuple(np.shape(g[k]))} != expected {tuple(w[k].shape)}"
    for k in w.keys() & g.keys()
    if tuple(np.shape(g[k])) != tuple(w[k].shape)
  )
  if missing or extra or shapes:
    raise ValueError(
      f"{what} does not match the model: missing {missing[:20]}{'...' if len(missing) > 20 else ''}"
      f"; unexpected {extra[:20]}{'...' if len(extra) > 20 else ''}; wrong shapes {shapes[:20]}"
    )


def short_error(e: BaseException, limit: int = 300) -> str:
  """The first line of an exception's message, at most `limit` characters (TensorStore and Orbax
  errors run to dozens of lines)."""
  text = str(e).strip() or type(e).__name__
  line = text.splitlines()[0]
  if len(line) > limit:
    line = line[: limit - 3] + "..."
  return f"{type(e).__name__}: {line}"


def is_params_checkpoint(path: str | os.PathLike) -> bool:
  """Whether `path` looks like an Orbax checkpoint directory (has its metadata files)."""
  path = os.fspath(path)
  return any(os.path.exists(os.path.join(path, f)) for f in ("_CHECKPOINT_METADATA", "_METADATA"))


def _checksum(x):
  """Position-weighted sum of the bits of x modulo 2**32: sum(u[i] * (2 i + 1)) over the flat
  index i of x's bits as unsigned ints. uint32 addition is associative and commutative, so the
  value does not depend on sharding or reduction order; the odd weights make any single change
  and most moves show."""
  if x.dtype == jnp.bool_:
    u = x.astype(jnp.uint32)
  else:
    width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    u = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
  idx, stride = jnp.zeros(u.shape, jnp.uint32), 1
  for d in reversed(range(u.ndim)):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
    stride *= u.shape[d]
  return jnp.sum(u * (2 * idx + 1), dtype=jnp.uint32)


@jax.jit
def _digest_jit(leaves):
  fin = [
    jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    for x in leaves
  ]
  return jnp.stack(fin), jnp.stack([_checksum(x) for x in leaves])


def _digest_np(x) -> tuple[bool, int]:
  """_checksum and the finiteness flag of one host array (same values as the device path)."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    u = x.astype(np.uint32).ravel()
  else:
    width = {1: np.uint8, 2: np.uint16}.get(x.dtype.itemsize, np.uint32)
    u = np.ascontiguousarray(x).view(width).astype(np.uint32).ravel()
  w = (2 * np.arange(u.size, dtype=np.uint64) + 1).astype(np.uint32)
  fin = (
    bool(np.isfinite(x.astype(np.float32)).all()) if jnp.issubdtype(x.dtype, jnp.inexact) else True
  )
  return fin, int(np.sum(u * w, dtype=np.uint32))


def digest(leaves) -> tuple[np.ndarray, np.ndarray]:
  """(finite flag, checksum) per array: all values finite (integer arrays count as finite) and a
  bit-level checksum. Arrays on CPU are read on the host (no compilation); others by one jitted
  reduction on their devices (nothing is gathered)."""
  leaves = list(leaves)
  if not leaves:
    return np.zeros(0, bool), np.zeros(0, np.uint32)
  on_cpu = all(
    not isinstance(x, jax.Array)
    or (x.is_fully_addressable and all(d.platform == "cpu" for d in x.sharding.device_set))
    for x in leaves
  )
  if on_cpu:
    out = [_digest_np(x) for x in leaves]
    return np.array([f for f, _ in out]), np.array([c for _, c in out], np.uint32)
  fin, sums = jax.device_get(_digest_jit(leaves))
  return np.asarray(fin), np.asarray(sums)


def _first_nonfinite(tree) -> str | None:
  """Dotted name of the first floating-point array of `tree` holding a NaN or Inf, or None."""
  flat = list(_flat(tree).items())
  fin, _ = digest(v for _, v in flat)
  return None if fin.all() else ".".join(flat[int(np.argmin(fin))][0])


def params_dict(model_or_state) -> dict:
  state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
  return nnx.to_pure_dict(state)


def save_params(path: str | os.PathLike, model_or_state) -> None:
  """Writes a params checkpoint atomically (Orbax writes to a temp dir, then renames)."""
  path = os.path.abspath(os.fspath(path))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, params_dict(model_or_state))
  ckptr.wait_until_finished()


def load_params(path: str | os.PathLike, model: nnx.Module) -> nnx.Module:
  """Restores a params checkpoint into `model` (shapes, dtypes and shardings taken from it).

  Raises ValueError naming missing / unexpected / mis-shaped parameters, a corrupt directory, or
  the first parameter holding a non-finite value.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise ValueError(f"params checkpoint {path} does not exist")
  state = nnx.state(model)
  want = nnx.to_pure_dict(state)
  ckptr = ocp.StandardCheckpointer()
  try:
    meta = ckptr.metadata(path)
    tree_meta = getattr(meta, "item_metadata", meta)
    tree_meta = getattr(tree_meta, "tree", tree_meta)
  except Exception as e:  # noqa: BLE001 - re-raised with the path
    raise ValueError(f"params checkpoint {path} is unreadable or corrupt: {short_error(e)}") from e
  if isinstance(tree_meta, dict):
    check_tree(tree_meta, want, f"params checkpoint {path}")
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), want
  )
  try:
    restored = ckptr.restore(path, target)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"params checkpoint {path} could not be restored: {short_error(e)}") from e
  bad = _first_nonfinite(restored)
  if bad:
    raise ValueError(f"params checkpoint {path}: non-finite values in {bad}")
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  return model
