# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""TPU top-k: exact path (lax.top_k) == reference; approx_max_k path meets its recall target
(on CPU it falls back to an exact sort, so there it must equal the exact set); TPU lowering of both
at the T1 shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.topk import kernel_tpu, ops, reference


def _scores(seed, shape):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  x[0, 7:] = -np.inf  # fewer valid keys than k
  x[1, :] = -np.inf  # fully masked row
  return jnp.asarray(x)


def _recall(idx, ref):
  hits, total = 0, 0
  for a, b in zip(np.asarray(idx), np.asarray(ref)):
    sa, sb = {int(i) for i in a if i >= 0}, {int(i) for i in b if i >= 0}
    hits += len(sa & sb)
    total += len(sb)
  return hits / max(total, 1)


@pytest.mark.parametrize("k", [16, 300])  # 300 > S: -1 padding
def test_exact_matches_reference(k):
  x = _scores(0, (6, 257))
  idx = ops.topk(x, k, impl="pallas", backend="tpu")
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(reference.topk_reference(x, k)))


@pytest.mark.parametrize("rt", [0.5, 0.95, 1.0])
def test_approx_recall_target(rt):
  x = _scores(1, (8, 1024))
  k = 64
  idx = ops.topk(x, k, impl="pallas", backend="tpu", recall_target=rt)
  ref = reference.topk_reference(x, k)
  assert idx.shape == ref.shape and idx.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(idx) < 0, np.asarray(ref) < 0)
  assert _recall(idx, ref) >= rt - 1e-6


def test_errors():
  with pytest.raises(ValueError, match="recall_target"):
    kernel_tpu.topk_tpu(jnp.zeros((2, 8)), 2, recall_target=1.5)
  with pytest.raises(ValueError, match="backend"):
    ops.topk(jnp.zeros((2, 8)), 2, impl="pallas", backend="cuda")


@pytest.mark.parametrize("rt", [None, 0.95])
def test_export_tpu_t1_shape(rt):
  x = jax.ShapeDtypeStruct((32768, 32768), jnp.float32)
  f = lambda s: kernel_tpu.topk_tpu(s, 2048, recall_target=rt)
  mod = export.export(jax.jit(f), platforms=["tpu"])(x).mlir_module()
  # the approximate path is XLA's TPU ApproxTopK custom call; the exact one a chlo.top_k
  assert ("ApproxTopK" in mod) == (rt is not None)
  assert ("chlo.top_k" in mod) == (rt is None)


@pytest.mark.tpu
def test_on_tpu_recall():
  x = jax.random.normal(jax.random.key(0), (256, 32768))
  ref = reference.topk_reference(x, 2048)
  for rt in (0.9, 0.95):
    assert _recall(kernel_tpu.topk_tpu(x, 2048, recall_target=rt), ref) >= rt - 0.02
