# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""128x128 block-scaled float8_e4m3fn weights: dequantise and re-quantise.

Format: docs/dsa.md §FP8 formats.

`W[i, j] = W8[i, j] * S[i // 128, j // 128]`, S = `weight_scale_inv` fp32 [ceil(out/128),
ceil(in/128)] (despite its name it multiplies).

Exact round trip: dequantising in fp32 gives fl(c·s) = c·s·(1+δ), |δ| <= 2^-24, and storing it in
bf16 adds |δ| <= 2^-9. Dividing by the *same* s and rounding to the nearest e4m3 recovers c,
because e4m3 neighbours are >= 2^-4 apart relative to the value (>= 2^-9 absolute among the
subnormals, where the error is < 2^-14). So re-quantising with the imported scale reproduces the
original codes and scales bit for bit, as long as the weights were not changed in between.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BLOCK = 128
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = 448.0


def scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
  return (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))


def dequantize(w8: np.ndarray, scale: np.ndarray) -> np.ndarray:
  """e4m3 [out, in] and fp32 block scales -> fp32 [out, in] (one row block at a time)."""
  out = w8.astype(np.float32)
  for r in range(scale.shape[0]):
    rows = out[r * BLOCK : (r + 1) * BLOCK]
    rows *= np.repeat(scale[r].astype(np.float32), BLOCK)[None, : out.shape[1]]
  return out


def _block_amax(w: np.ndarray) -> np.ndarray:
  sr, sc = scale_shape(w.shape)
  amax = np.zeros((sr, sc), np.float32)
  for r in range(sr):
    rows = np.abs(w[r * BLOCK : (r + 1) * BLOCK].astype(np.float32))
    pad = sc * BLOCK - rows.shape[1]
    if pad:
      rows = np.pad(rows, ((0, 0), (0, pad)))
    amax[r] = rows.reshape(rows.shape[0], sc, BLOCK).max(axis=(0, 2))
  return amax


def quantize(w: np.ndarray, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """[out, in] float -> (e4m3 codes, fp32 block scales).

  scale: the checkpoint's original block scales (kept from the import); used for every block it
  still covers (amax/s <= 448, up to storage rounding), so unchanged weights re-quantise bit-exactly. Other blocks (and all
  blocks when scale is None) get amax/448, the largest-magnitude weight mapping to ±448.
  """
  amax = _block_amax(w)
  fresh = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0)).astype(np.float32)
  if scale is None:
    s = fresh
  else:
    s = scale.astype(np.float32)
    # Slack for the storage rounding of c·s (bf16: 2^-9): ±448 codes must keep their scale;
    # the clip below then maps them back to ±448 exactly.
    s = np.where((s > 0) & (amax <= s * np.float32(E4M3_MAX * (1 + 2**-7))), s, fresh)
  codes = np.empty(w.shape, E4M3)
  for r in range(s.shape[0]):
    rows = w[r * BLOCK : (r + 1) * BLOCK].astype(np.float32)
    rows /= np.repeat(s[r], BLOCK)[None, : w.shape[1]]
    codes[r * BLOCK : (r + 1) * BLOCK] = np.clip(rows, -E4M3_MAX, E4M3_MAX).astype(E4M3)
  return codes, s
