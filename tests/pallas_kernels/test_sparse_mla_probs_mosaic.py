# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The Mosaic GPU head-mean probabilities (kernel_mosaic_gpu_probs.py, the GPU path of
ops.sparse_mla_probs) vs the reference: in the GPU interpreter on CPU at awkward shapes (heads and slots padded, an odd
number of chunks, ids < 0 and >= S, repeats, a row with no valid slot, k > S), the real Mosaic
GPU lowering at V3.2 shapes, and `-m gpu` at V3.2 dims (within 1e-5 absolute)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels.sparse_mla import ops, reference

SCALE = 0.13


def _case(b, t, h, k_dim, s, k, dtype, seed=0):
  q = _testing.normal(seed, (b, t, h, k_dim), dtype)
  kv = _testing.normal(seed + 1, (b, s, k_dim), dtype)
  idx = jax.random.randint(jax.random.key(seed + 2), (b, t, k), -3, s + 3, jnp.int32)
  idx = idx.at[:, :, -1].set(2)  # the same row chosen by every token
  idx = idx.at[-1, -1, : min(k, 5)].set(1)  # repeats within a row
  idx = idx.at[0, 0].set(-1)  # a row with no valid slot
  lse = reference.sparse_mla_reference(q, kv, idx, scale=SCALE, d_v=k_dim)[1]
  return q, kv, idx, lse


@pytest.mark.parametrize(
  "dtype, shape",
  [
    # H 20 (-> 64), k 150 (-> 192: 3 chunks, WG0 takes two, the last one half padding),
    # Kp 96 -> 128, k > S, B 2
    (jnp.bfloat16, (2, 3, 20, 96, 40, 150)),
    # two head blocks (H 72 -> 128), one chunk (WG1 idle)
    (jnp.float16, (1, 2, 72, 64, 90, 64)),
  ],
)
def test_interpret_matches_reference(dtype, shape):
  b, t, h, k_dim, s, k = shape
  q, kv, idx, lse = _case(*shape, dtype)
  with jax.default_matmul_precision("highest"):
    want = reference.sparse_mla_probs_reference(q, kv, idx, lse, scale=SCALE)
  got = ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE, impl="pallas", interpret=True)
  assert got.shape == want.shape == idx.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-5)
  valid = (np.asarray(idx) >= 0) & (np.asarray(idx) < s)
  assert (np.asarray(got)[~valid] == 0).all()
  assert (np.asarray(got[0, 0]) == 0).all()
  # every head's probabilities sum to 1 over its valid slots, so does their mean
  sums = np.asarray(got).sum(-1)[valid.any(-1)]
  np.testing.assert_allclose(sums, 1.0, atol=1e-4)


def test_f32_and_long_topk_take_the_reference():
  """f32 inputs (no bf16 wgmma) and ids over the SMEM budget do not reach the kernel; without
  interpret and off the GPU the op is the reference (no kernel call)."""
  q, kv, idx, lse = _case(1, 2, 16, 64, 30, 24, jnp.float32)
  assert not ops._mosaic_probs_fit(q, kv, idx)
  got = ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE, impl="pallas", interpret=True)
  np.testing.assert_array_equal(
    got, reference.sparse_mla_probs_reference(q, kv, idx, lse, scale=SCALE)
  )
  qb, kvb = q.astype(jnp.bfloat16), kv.astype(jnp.bfloat16)
  jaxpr = str(jax.make_jaxpr(lambda: ops.sparse_mla_probs(qb, kvb, idx, lse, scale=SCALE))())
  assert "mosaic_gpu" not in jaxpr and "pallas" not in jaxpr
  long_idx = jax.ShapeDtypeStruct((1, 2, 16384), jnp.int32)
  q576 = jax.ShapeDtypeStruct((1, 2, 128, 576), jnp.bfloat16)
  assert not ops._mosaic_probs_fit(q576, q576, long_idx)
  assert ops._mosaic_probs_fit(q576, q576, jax.ShapeDtypeStruct((1, 2, 2048), jnp.int32))


def test_under_grad_the_target_is_a_constant():
  """Inside a differentiated loss the kernel's output is a constant: grad traces (a Pallas call
  has no JVP rule) and gives the gradient of the other terms only."""
  q, kv, idx, lse = _case(1, 2, 16, 64, 30, 64, jnp.bfloat16, seed=9)

  def loss(q, kv):
    p = ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE, impl="pallas", interpret=True)
    return jnp.sum(p * p) + jnp.sum(q.astype(jnp.float32))

  gq, gkv = jax.grad(loss, (0, 1))(q, kv)
  np.testing.assert_array_equal(gq, jnp.ones_like(q))
  np.testing.assert_array_equal(gkv, jnp.zeros_like(kv))


def test_cross_lowering_cuda_full_shape(monkeypatch):
  """The real Mosaic GPU lowering at V3.2 shapes (SMEM budget, layouts, the inline cp.async
  builders); the interpreter misses these."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  t, s, h, k_dim, k = 4096, 32768, 128, 576, 2048
  sds = jax.ShapeDtypeStruct
  args = (
    sds((1, t, h, k_dim), jnp.bfloat16),
    sds((1, s, k_dim), jnp.bfloat16),
    sds((1, t, k), jnp.int32),
    sds((1, t, h), jnp.float32),
  )
  f = lambda q, kv, idx, lse: ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE, impl="pallas")
  mlir = jax.export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()
  assert "mosaic_gpu" in mlir and "cp.async.cg.shared.global" in mlir


@pytest.mark.gpu
def test_gpu_v32_dims():
  if jax.default_backend() != "gpu":
    pytest.skip("needs an NVIDIA GPU")
  q, kv, idx, lse = _case(2, 64, 128, 576, 700, 2048, jnp.bfloat16, seed=3)
  with jax.default_matmul_precision("highest"):
    want = reference.sparse_mla_probs_reference(q, kv, idx, lse, scale=SCALE)
  got = jax.jit(lambda *a: ops.sparse_mla_probs(*a, scale=SCALE, impl="pallas"))(q, kv, idx, lse)
  np.testing.assert_allclose(got, want, atol=1e-5)
