# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Streaming safetensors reader and writer (one tensor in memory at a time).

Why not `safetensors.numpy` for the data: numpy has no float8 dtype, so its backend cannot return
the F8_E4M3 weights of DeepSeek checkpoints (docs/dsa.md §FP8 formats). `safe_open` still validates
every header; tensor bytes are then read at the header's offsets and viewed with ml_dtypes. The
writer lays a file out exactly as the safetensors library does (tensors sorted by dtype rank then
name, compact JSON header padded with spaces to 8 bytes), so a file written from the same tensors is
byte-identical, and it writes the header first, then each tensor as it is produced.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import safe_open

DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),  # DeepSeek-V4's power-of-two block scales
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U64": np.dtype(np.uint64),
  "U32": np.dtype(np.uint32),
  "U16": np.dtype(np.uint16),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
NAME_OF = {v: k for k, v in DTYPES.items()}
# The safetensors library orders tensors by its Dtype enum, largest first (measured with 0.8.0).
_RANK = "BOOL U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 I16 U16 F16 BF16 I32 U32 F32 F64 I64 U64".split()


class TensorInfo:
  __slots__ = ("name", "dtype", "shape", "start", "end", "path")

  def __init__(self, name, dtype, shape, start, end, path):
    self.name, self.dtype, self.shape = name, dtype, tuple(shape)
    self.start, self.end, self.path = start, end, path

  @property
  def nbytes(self) -> int:
    return self.end - self.start


class Reader:
  """A validated safetensors file: `infos` (name -> TensorInfo) and `read(name)` -> np.ndarray."""

  def __init__(self, path: str):
    self.path = path
    try:
      with safe_open(path, framework="numpy") as f:  # validates header, offsets and file size
        self.metadata = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types; re-raised as ValueError
      raise ValueError(f"safetensors file {path} is truncated or corrupt: {e}") from None
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    self.data_start = 8 + n
    self.infos: dict[str, TensorInfo] = {}
    for name, h in header.items():
      if name == "__metadata__":
        continue
      start, end = h["data_offsets"]
      self.infos[name] = TensorInfo(name, h["dtype"], h["shape"], start, end, path)

  def read(self, name: str) -> np.ndarray:
    info = self.infos[name]
    dt = DTYPES.get(info.dtype)
    if dt is None:
      raise ValueError(f"{name} in {self.path}: unsupported safetensors dtype {info.dtype}")
    a = np.fromfile(self.path, np.uint8, count=info.nbytes, offset=self.data_start + info.start)
    if a.size != info.nbytes:
      raise ValueError(f"{name} in {self.path}: file ends inside the tensor (truncated)")
    return a.view(dt).reshape(info.shape)


def layout(specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict | None = None):
  """(header bytes, ordered names) for tensors {name: (dtype name, shape)}, as safetensors lays out."""
  order = sorted(specs, key=lambda k: (-_RANK.index(specs[k][0]), k))
  header: dict = {}
  if metadata:
    header["__metadata__"] = metadata
  off = 0
  for k in order:
    dt, shape = specs[k]
    n = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
    header[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
    off += n
  hb = json.dumps(header, separators=(",", ":")).encode()
  hb += b" " * (-len(hb) % 8)
  return struct.pack("<Q", len(hb)) + hb, order


class Writer:
  """Writes one safetensors file whose tensor names, dtypes and shapes are known up front.

  Tensors must be given in `self.order` (the on-disk order); `close()` checks that all were written.
  """

  def __init__(
    self, path: str, specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict | None = None
  ):
    self.path, self.specs = path, specs
    header, self.order = layout(specs, metadata)
    self._f = open(path, "wb")
    self._f.write(header)
    self._next = 0

  def write(self, name: str, arr: np.ndarray) -> None:
    want = self.order[self._next]
    dt, shape = self.specs[name]
    if name != want or arr.dtype != DTYPES[dt] or tuple(arr.shape) != tuple(shape):
      raise AssertionError(
        f"{self.path}: got {name} {arr.dtype}{arr.shape}, want {want} {dt}{shape}"
      )
    self._f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)  # no extra copy
    self._next += 1

  def close(self) -> None:
    self._f.close()
    if self._next != len(self.order):
      raise AssertionError(f"{self.path}: wrote {self._next} of {len(self.order)} tensors")


def dtype_name(dt) -> str:
  return NAME_OF[np.dtype(dt)]


def file_size(path: str) -> int:
  return os.path.getsize(path)
