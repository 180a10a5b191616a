# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Top-k: reference vs a naive formula; the radix-select kernel (interpret mode) vs the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.topk import kernel, ops, reference


def _naive_topk(x, k):
  """Descending total order (+0.0 above -0.0), lower index first on ties; -inf slots -> -1."""
  out = np.full(x.shape[:-1] + (k,), -1, np.int32)
  for r in np.ndindex(x.shape[:-1]):
    row = x[r]
    order = np.lexsort((np.arange(row.size), np.signbit(row), -row))[:k]
    order = [i for i in order if row[i] > -np.inf]
    out[r][: len(order)] = order
  return out


def _sets(idx):
  return [
    sorted(int(i) for i in row if i >= 0) for row in np.asarray(idx).reshape(-1, idx.shape[-1])
  ]


def _scores(seed, shape, kind):
  rng = np.random.default_rng(seed)
  if kind == "normal":
    x = rng.standard_normal(shape).astype(np.float32)
  else:  # integer-valued: many exact ties
    x = rng.integers(-4, 5, size=shape).astype(np.float32)
  x[..., 0, 7:] = -np.inf  # a row with fewer valid keys than k
  x[..., 1, :] = -np.inf  # a fully masked row
  x[..., 2, ::3] = -0.0  # signed zeros: -0.0 ranks below +0.0 (lax.top_k's total order)
  x[..., 3, :] = np.where(np.arange(shape[-1]) % 3 == 0, 0.0, -0.0)  # k cuts through the zeros
  return x


def test_reference_matches_naive():
  x = _scores(0, (2, 5, 40), "ints")
  np.testing.assert_array_equal(
    np.asarray(reference.topk_reference(jnp.asarray(x), 12)), _naive_topk(x, 12)
  )


@pytest.mark.parametrize(
  "kind,shape,k,chunk,radix",
  [
    ("ints", (6, 300), 64, 64, 4),
    ("normal", (2, 4, 200), 33, 32, 2),
    ("ints", (5, 40), 64, 16, 8),  # k > S: every valid key, then -1
  ],
)
def test_pallas_select_matches_reference(kind, shape, k, chunk, radix):
  x = jnp.asarray(_scores(1, shape, kind))
  bs = kernel.BlockSizes(chunk=chunk, radix_bits=radix)
  got = ops.topk(x, k, impl="pallas", interpret=True, block_sizes=bs)
  want = ops.topk(x, k, impl="reference")
  assert got.shape == want.shape and got.dtype == jnp.int32
  assert _sets(got) == _sets(want)
  # slots are ascending key indices, -1 padding last
  for row in np.asarray(got).reshape(-1, k):
    valid = row[row >= 0]
    assert np.all(np.diff(valid) > 0) and np.all(row[len(valid) :] == -1)


def test_pallas_select_row_lengths():
  x = jnp.asarray(_scores(2, (4, 128), "ints"))
  lengths = jnp.array([128, 50, 3, 100], jnp.int32)
  got = kernel.select_topk(
    x, lengths, k=20, block_sizes=kernel.BlockSizes(chunk=32), interpret=True
  )
  masked = jnp.where(jnp.arange(128)[None] < lengths[:, None], x, -jnp.inf)
  assert _sets(got) == _sets(reference.topk_reference(masked, 20))


def test_validation():
  with pytest.raises(ValueError, match="k=0"):
    ops.topk(jnp.ones((2, 8)), 0, impl="pallas")
  with pytest.raises(ValueError, match="impl"):
    ops.topk(jnp.ones((2, 8)), 2, impl="cuda")
  with pytest.raises(ValueError, match="floating"):
    ops.topk(jnp.ones((2, 8), jnp.int32), 2, impl="pallas")
  with pytest.raises(ValueError, match="power of 2"):
    kernel.BlockSizes(chunk=48)


def test_export_cuda_t1_shape():
  """Pallas-Triton lowering of the select kernel at T1's shape (32768 rows x 32768, k=2048)."""
  f = jax.jit(lambda x: ops.topk(x, 2048, impl="pallas"))
  mesh = jax.sharding.AbstractMesh(
    (),
    (),
    abstract_device=jax.sharding.AbstractDevice(
      device_kind="NVIDIA H200", platform="gpu", num_cores=132
    ),
  )
  with jax.sharding.use_abstract_mesh(mesh):
    exp = export.export(
      f,
      platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)],
    )(jax.ShapeDtypeStruct((32768, 32768), jnp.float32))
  assert "radix_select_topk" in exp.mlir_module() or exp.out_avals[0].shape == (32768, 2048)


@pytest.mark.gpu
def test_gpu_select_matches_reference():
  x = jax.random.normal(jax.random.key(0), (512, 32768), jnp.float32)
  x = jnp.round(x * 8) / 8  # ties
  got = ops.topk(x, 2048, impl="pallas")
  assert _sets(got) == _sets(ops.topk(x, 2048, impl="reference"))
