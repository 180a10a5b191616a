# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Orbax checkpoints: parameter trees (the format converters write) and full training state.

A *params checkpoint* is an Orbax StandardCheckpointer directory holding the pure nested dict of
the model's parameters and router biases (`nnx.to_pure_dict(nnx.state(model))`), keyed by module
path, layer-stacked (leading layer axis in `dense_layers` / `moe_layers`), Linear kernels [in, out].
"""

from __future__ import annotations

import os

import jax
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

  Raises ValueError naming missing / unexpected / mis-shaped parameters, or a corrupt directory.
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
    raise ValueError(f"params checkpoint {path} is unreadable or corrupt: {e}") from e
  if isinstance(tree_meta, dict):
    check_tree(tree_meta, want, f"params checkpoint {path}")
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), want
  )
  try:
    restored = ckptr.restore(path, target)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"params checkpoint {path} could not be restored: {e}") from e
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  return model
