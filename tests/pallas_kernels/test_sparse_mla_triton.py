# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Head-mean sparse-attention probabilities as a Pallas-Triton kernel (kernel_triton.py) against
the reference: interpret mode on CPU at small awkward shapes (f32 and bf16, invalid / duplicate
ids, a fully masked row, k >= S, no second row part), CUDA lowering at V3.2 shapes, and `-m gpu`
runs at V3.2 dims."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _testing
from pallas_kernels.sparse_mla import kernel_triton, ops, reference

SCALE = 0.13
SMALL = kernel_triton.BlockSizes(block_h=16, block_k=16, num_warps=4)


def _case(b, t, h, k_dim, s, k, dtype, seed=0):
  q = _testing.normal(seed, (b, t, h, k_dim), dtype)
  kv = _testing.normal(seed + 1, (b, s, k_dim), dtype)
  idx = jax.random.randint(jax.random.key(seed + 2), (b, t, k), -3, s + 3, jnp.int32)
  idx = idx.at[:, :, -1].set(2)  # the same row chosen by every token
  idx = idx.at[-1, -1, : min(k, 5)].set(1)  # duplicates within a row
  idx = idx.at[0, 0].set(-1)  # a fully masked row
  return q, kv, idx


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_probs_interpret_matches_reference(monkeypatch, dtype):
  q, kv, idx = _case(2, 3, 20, 96, 40, 24, dtype, seed=5)
  lse = reference.sparse_mla_reference(q, kv, idx, scale=SCALE, d_v=64)[1]
  monkeypatch.setattr(ops, "PROBS_BLOCK_SIZES", SMALL)
  with jax.default_matmul_precision("highest"):
    got = ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE, impl="pallas", interpret=True)
    want = reference.sparse_mla_probs_reference(q, kv, idx, lse, scale=SCALE)
  assert got.shape == want.shape == idx.shape and got.dtype == jnp.float32
  atol = 1e-6 if dtype == jnp.float32 else 2e-3
  np.testing.assert_allclose(got, want, atol=atol)
  assert (np.asarray(got[0, 0]) == 0).all()
  valid = (np.asarray(idx) >= 0) & (np.asarray(idx) < 40)
  assert (np.asarray(got)[~valid] == 0).all()
  # K a power of 2: no second row part
  q2, kv2 = q[..., :64], kv[..., :64]
  lse2 = reference.sparse_mla_reference(q2, kv2, idx, scale=SCALE, d_v=64)[1]
  with jax.default_matmul_precision("highest"):
    got2 = ops.sparse_mla_probs(q2, kv2, idx, lse2, scale=SCALE, impl="pallas", interpret=True)
    want2 = reference.sparse_mla_probs_reference(q2, kv2, idx, lse2, scale=SCALE)
  np.testing.assert_allclose(got2, want2, atol=atol)
  # without interpret and off the GPU the op is the reference (no pallas_call)
  jaxpr = str(jax.make_jaxpr(lambda: ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE))())
  assert "pallas_call" not in jaxpr


def test_probs_kernel_under_grad(monkeypatch):
  """Inside a differentiated function (the trainer's loss) the kernel's target is a constant:
  grad traces (a pallas_call has no JVP rule) and gives the gradient of the other terms only."""
  monkeypatch.setattr(ops, "PROBS_BLOCK_SIZES", SMALL)
  q, kv, idx = _case(1, 2, 16, 96, 30, 24, jnp.float32, seed=9)
  lse = reference.sparse_mla_reference(q, kv, idx, scale=SCALE, d_v=64)[1]

  def loss(q, kv):
    p = ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE, impl="pallas", interpret=True)
    return jnp.sum(p * p) + jnp.sum(q)

  gq, gkv = jax.grad(loss, (0, 1))(q, kv)
  np.testing.assert_array_equal(gq, jnp.ones_like(q))
  np.testing.assert_array_equal(gkv, jnp.zeros_like(kv))


def test_block_sizes_validate():
  with pytest.raises(ValueError, match="block_k=24"):
    kernel_triton.BlockSizes(block_k=24)
  with pytest.raises(ValueError, match="block_h=8"):
    kernel_triton.BlockSizes(block_h=8)
  assert kernel_triton.split_dims(576) == (512, 512, 64)
  assert kernel_triton.split_dims(512) == (512, 512, 0)
  assert kernel_triton.split_dims(96) == (64, 64, 32)
  assert kernel_triton.split_dims(72) == (64, 64, 16)


def _export_cuda(f, *avals):
  return _testing.export_cuda(f, *avals)


def test_export_cuda_v32_shapes(monkeypatch, triton_verified):
  """The probabilities lower for cuda at V3.2 dims (128 heads, 576 = 512 + 64, k = 2048) through
  the op (as on a GPU), the Triton module passing the MLIR verifier."""
  verified = triton_verified
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  b, t, s, h, k = 2, 256, 4096, 128, 2048
  sds = jax.ShapeDtypeStruct
  args = (
    sds((b, t, h, 576), jnp.bfloat16),
    sds((b, s, 576), jnp.bfloat16),
    sds((b, t, k), jnp.int32),
    sds((b, t, h), jnp.float32),
  )
  probs = lambda q, kv, idx, lse: ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE, impl="pallas")
  exp = _export_cuda(probs, *args)
  assert [a.shape for a in exp.out_avals] == [(b, t, k)]
  assert exp.mlir_module().count(pltriton.CUSTOM_CALL_TARGET_NAME) == 1
  assert verified == [True]


def _on_gpu():
  if jax.default_backend() != "gpu":
    pytest.skip("needs an NVIDIA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("bsz", [kernel_triton.BlockSizes(), SMALL], ids=["default", "small"])
def test_gpu_probs_v32_dims(monkeypatch, bsz):
  """On the GPU at V3.2 dims (128 heads, 576, k = 2048 with invalid ids and duplicates) through
  the op: within 1e-5 absolute of the reference on the same bf16 inputs in f32."""
  _on_gpu()
  monkeypatch.setattr(ops, "PROBS_BLOCK_SIZES", bsz)
  b, t, h, s, k = 2, 64, 128, 4096, 2048
  q, kv, idx = _case(b, t, h, 576, s, k, jnp.bfloat16, seed=11)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    lse = reference.sparse_mla_reference(f32(q), f32(kv), idx, scale=SCALE, d_v=512)[1]
    want = reference.sparse_mla_probs_reference(f32(q), f32(kv), idx, lse, scale=SCALE)
  got = jax.jit(
    lambda q, kv, idx, lse: ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE, impl="pallas")
  )(q, kv, idx, lse)
  assert "pallas_call" in str(
    jax.make_jaxpr(lambda: ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE, impl="pallas"))()
  )
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert (np.asarray(got[0, 0]) == 0).all()
