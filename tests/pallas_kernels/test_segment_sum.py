# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The sorted segment sum of the sparse-MLA and sparse indexer-KL backwards
(kernel_segment_sum_triton.py) in the Triton interpreter vs a numpy loop: ids < 0 and >= R
dropped, rows with no position keep init, a row with more positions than one block; and its CUDA
lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels.sparse_mla import kernel_segment_sum_triton as ss


def _numpy(rows, ids, init):
  out = np.asarray(init, np.float64).copy()
  r = out.shape[0]
  rf = np.asarray(rows, np.float64)
  for p, i in enumerate(np.asarray(ids)):
    if 0 <= i < r:
      out[i] += rf[p]
  return out


@pytest.mark.parametrize(
  "seed,dtype,c,block_c",
  [
    (1, jnp.float32, 128, 64),
    (2, jnp.bfloat16, 128, 64),
    (3, jnp.bfloat16, 192, 256),
    (4, jnp.bfloat16, 192, None),
    (5, jnp.float32, 128, None),
  ],
)
def test_segment_sum_matches_numpy(seed, dtype, c, block_c):
  # block_c 256 > C 192, or None (the default): whole rows, one masked load each (the columns
  # past C untouched); 64: column pieces
  m, r = 90, 11
  rng = np.random.default_rng(seed)
  ids = rng.integers(-3, r + 3, size=m)
  ids[:40] = 4  # one row gets more positions than a block of 32
  ids[ids == 7] = 8  # row 7 gets none: keeps init
  rows = _testing.normal(1, (m, c), dtype)
  init = _testing.normal(2, (r, c))
  order, starts = ss.sort_segments(jnp.asarray(ids, jnp.int32), r)
  assert int(starts[-1]) == int(((ids >= 0) & (ids < r)).sum())
  out = ss.segment_sum_rows(rows, order, starts, init, block_c=block_c, interpret=True)
  np.testing.assert_allclose(out, _numpy(rows, ids, init), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[7], init[7])


def test_segment_sum_no_valid_id_and_errors():
  rows = jnp.ones((16, 128), jnp.float32)
  init = _testing.normal(0, (5, 128))
  order, starts = ss.sort_segments(jnp.full((16,), -1, jnp.int32), 5)
  out = ss.segment_sum_rows(rows, order, starts, init, interpret=True)
  np.testing.assert_array_equal(out, init)
  with pytest.raises(ValueError, match="init"):
    ss.segment_sum_rows(rows, order, starts, init[:4], interpret=True)
  with pytest.raises(ValueError, match="columns"):  # 96 columns: not 64s, and more than 64
    ss.segment_sum_rows(rows[:, :96], order, starts, init[:, :96], block_c=64, interpret=True)
  with pytest.raises(ValueError, match="power of two"):  # 96 > 48 but not a power of two
    ss.segment_sum_rows(rows[:, :48], order, starts, init[:, :48], block_c=96, interpret=True)


def test_block_tokens():
  # V3.2's sparse KL: 2048 slots x 128 columns a token -> 4096 tokens
  assert ss.block_tokens(32768, 2048 * 128) == 4096
  assert ss.block_tokens(4096, 2 * 2048 * 576) == 512
  assert ss.block_tokens(100, 2 * 2048 * 576) == 64  # at most n, a power of two
  assert ss.block_tokens(3, 64 * 64) == 2
  m = ss.max_tokens(2048 * 576)  # the largest count below the int32 range, not a power of two
  assert m * 2048 * 576 < 2**31 <= (m + 1) * 2048 * 576 and m == 1820
  with pytest.raises(ValueError, match="int32"):
    ss.block_tokens(8, 2**31)


@pytest.mark.parametrize("kw", [{}, dict(block_c=64, block_r=32)])
def test_segment_sum_cuda_lowering(kw, triton_verified):
  """V3.2 sizes of one sparse-MLA backward scan step: 512 tokens x 2048 slots, 32K rows of 576
  columns (whole masked rows, the default, or 64-column pieces); the Triton module passes the
  verifier."""
  sds = jax.ShapeDtypeStruct
  p, r = 512 * 2048, 32768

  def f(rows, ids, init):
    return ss.segment_sum_rows(rows, *ss.sort_segments(ids, r), init, **kw)

  mlir = _testing.export_cuda(
    f, sds((p, 576), jnp.bfloat16), sds((p,), jnp.int32), sds((r, 576), jnp.float32)
  ).mlir_module()
  assert "segment_sum_rows" in mlir
  assert triton_verified == [True]
