# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Slice-wise writing and reading of Orbax params checkpoints with tensorstore.

Our layers are stacked ([L, ...], experts [L, E, ...]), so a whole leaf can be most of the model.
The writer therefore creates each leaf as an on-disk zarr array and writes one HF tensor's slice at
a time. The layout is Orbax's own non-OCDBT format (`PyTreeCheckpointHandler(use_ocdbt=False)`: one
zarr v2 array per leaf, named by its dotted path, plus `_METADATA` / `_CHECKPOINT_METADATA`), which
`ocp.StandardCheckpointer().restore` - hence `dsa_jax.checkpoint.load_params` - reads as it reads
the OCDBT checkpoints that `save_params` writes. Chunks are one slice each ([1]*depth + the tensor,
split further to <= 64 MiB), so every slice write covers whole chunks (no read-modify-write).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import tensorstore as ts

_CHUNK_BYTES = 64 << 20
_ZARR_DTYPE = {"float32": "<f4", "bfloat16": "bfloat16", "float16": "<f2", "int32": "<i4"}


def _context():
  # No chunk cache: each slice is written or read once; a cache would only hold memory.
  return ts.Context({"cache_pool": {"total_bytes_limit": 0}})


def chunk_shape(shape: tuple[int, ...], depth: int, itemsize: int) -> list[int]:
  inner = list(shape[depth:])
  chunks = [1] * depth + inner
  if inner:
    row = math.prod(inner[1:]) * itemsize
    chunks[depth] = max(1, min(inner[0], _CHUNK_BYTES // max(row, 1)))
  return chunks


class Writer:
  """Creates the leaves {dotted name: (shape, dtype, depth)} under `path` and writes slices."""

  def __init__(self, path: str, leaves: dict[str, tuple[tuple[int, ...], np.dtype, int]]):
    self.path, self.leaves = path, leaves
    self._ctx = _context()
    self._arrays = {}
    os.makedirs(path, exist_ok=True)
    for name, (shape, dtype, depth) in leaves.items():
      dtype = np.dtype(dtype)
      spec = {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": os.path.join(path, name)},
        "metadata": {
          "shape": list(shape),
          "chunks": chunk_shape(shape, depth, dtype.itemsize),
          "dtype": _ZARR_DTYPE[dtype.name],
          "compressor": {"id": "zstd", "level": 1},  # Orbax's default codec
          "fill_value": None,
          "dimension_separator": ".",
        },
        "create": True,
        "delete_existing": True,
      }
      self._arrays[name] = ts.open(spec, context=self._ctx).result()

  def write(self, name: str, index: tuple[int, ...], value: np.ndarray) -> None:
    arr = self._arrays[name]
    want = tuple(arr.shape[len(index) :])
    if tuple(value.shape) != want:
      raise AssertionError(f"{name}{list(index)}: shape {value.shape} != {want}")
    target = arr[index] if index else arr
    target.write(np.asarray(value, dtype=arr.dtype.numpy_dtype)).result()

  def read(self, name: str, index: tuple[int, ...]) -> np.ndarray:
    arr = self._arrays[name]
    return (arr[index] if index else arr).read().result()

  def finalize(self) -> None:
    """Writes Orbax's metadata files (what `PyTreeCheckpointHandler` writes for this layout)."""
    tree = {}
    for name, (shape, dtype, depth) in self.leaves.items():
      keys = name.split(".")
      tree[str(tuple(keys))] = {
        "key_metadata": [{"key": k, "key_type": 2} for k in keys],  # 2 = dict key
        "value_metadata": {
          "value_type": "jax.Array",
          "skip_deserialize": False,
          "write_shape": list(shape),
        },
      }
    meta = {
      "tree_metadata": tree,
      "use_ocdbt": False,
      "use_zarr3": False,
      "store_array_data_equal_to_fill_value": True,
      "custom_metadata": None,
    }
    _write_json(os.path.join(self.path, "_METADATA"), meta)
    now = time.time_ns()
    _write_json(
      os.path.join(self.path, "_CHECKPOINT_METADATA"),
      {
        "item_handlers": "orbax.checkpoint._src.handlers.standard_checkpoint_handler."
        "StandardCheckpointHandler",
        "metrics": {},
        "performance_metrics": {},
        "init_timestamp_nsecs": now,
        "commit_timestamp_nsecs": now,
        "custom_metadata": {},
      },
    )
    self._arrays.clear()


class Reader:
  """Reads slices of the leaves of an Orbax params checkpoint (OCDBT or per-leaf zarr)."""

  def __init__(self, path: str):
    self.path = path
    meta_path = os.path.join(path, "_METADATA")
    if not os.path.isfile(meta_path):
      raise ValueError(f"{path} is not an Orbax params checkpoint (no _METADATA)")
    with open(meta_path) as f:
      meta = json.load(f)
    self.use_ocdbt = bool(meta.get("use_ocdbt", True))
    self.zarr3 = bool(meta.get("use_zarr3", False))
    self.names = [
      ".".join(str(k["key"]) for k in v["key_metadata"]) for v in meta["tree_metadata"].values()
    ]
    self._ctx = _context()
    self._arrays = {}

  def _open(self, name: str):
    if name not in self._arrays:
      if self.use_ocdbt:
        kv = {"driver": "ocdbt", "base": f"file://{os.path.abspath(self.path)}/", "path": name}
      else:
        kv = {"driver": "file", "path": os.path.join(self.path, name)}
      spec = {"driver": "zarr3" if self.zarr3 else "zarr", "kvstore": kv}
      try:
        self._arrays[name] = ts.open(spec, open=True, context=self._ctx).result()
      except Exception as e:  # noqa: BLE001 - tensorstore errors, re-raised naming the leaf
        raise ValueError(f"Orbax checkpoint {self.path}: leaf {name} is unreadable: {e}") from None
    return self._arrays[name]

  def shape_dtype(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
    a = self._open(name)
    return tuple(a.shape), a.dtype.numpy_dtype

  def read(self, name: str, index: tuple[int, ...]) -> np.ndarray:
    a = self._open(name)
    return np.asarray((a[index] if index else a).read().result())


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f)
