# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sparse-MLA Pallas-Triton backward and head-mean probabilities (kernel_triton.py) against
autodiff of the reference and the reference probabilities: interpret mode on CPU at small awkward
shapes (f32 and bf16, both cotangents, invalid / duplicate ids, a fully masked row, k >= S, no
second row part), CUDA lowering at V3.2 shapes, and `-m gpu` runs at V3.2 dims."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
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


def _ref_grads(q, kv, idx, do, dl, d_v):
  f32 = lambda x: x.astype(jnp.float32)
  fn = lambda q, kv: reference.sparse_mla_reference(q, kv, idx, scale=SCALE, d_v=d_v)
  (o, lse), vjp = jax.vjp(fn, f32(q), f32(kv))
  return o, lse, vjp((f32(do), dl))


@pytest.mark.parametrize(
  "dtype,b,t,h,k_dim,d_v,s,k",
  [
    (jnp.float32, 2, 3, 20, 96, 64, 40, 24),  # 20 heads -> 32, 96 = 64 + 32, ragged k (24 -> 32)
    (jnp.float32, 1, 2, 16, 64, 64, 12, 40),  # K = d_v (no second part, V4-like), k > S
    (jnp.bfloat16, 2, 2, 32, 80, 48, 50, 40),  # d_v 48 -> 64, rest 32, bf16
  ],
)
def test_bwd_interpret_matches_reference(dtype, b, t, h, k_dim, d_v, s, k):
  q, kv, idx = _case(b, t, h, k_dim, s, k, dtype)
  do, dl = _cts(b, t, h, d_v, dtype, idx, q, kv)
  with jax.default_matmul_precision("highest"):
    out, lse, (rq, rkv) = _ref_grads(q, kv, idx, do, dl, d_v)
    dq, dkv = ops._bwd_triton(
      q, kv, idx, out.astype(dtype), lse, do, dl, scale=SCALE, d_v=d_v, bsz=SMALL, interpret=True
    )
  assert dq.dtype == q.dtype and dkv.dtype == kv.dtype
  assert dq.shape == q.shape and dkv.shape == kv.shape
  tol = 1e-5 if dtype == jnp.float32 else 2 * _testing.tolerances(dtype)
  assert _testing.rel_err(dq, rq) < tol, _testing.rel_err(dq, rq)
  assert _testing.rel_err(dkv, rkv) < tol, _testing.rel_err(dkv, rkv)
  assert (np.asarray(dq[0, 0], np.float32) == 0).all()  # the masked row gets no gradient


def _cts(b, t, h, d_v, dtype, idx, q, kv):
  """(dO, dlse) cotangents; dlse is 0 where lse is +inf (rows with no valid slot)."""
  s = kv.shape[1]
  no_slot = ~jnp.any((idx >= 0) & (idx < s), axis=-1)[..., None]  # [B,T,1]
  do = _testing.normal(7, (b, t, h, d_v), dtype)
  dl = jnp.where(no_slot, 0.0, _testing.normal(8, (b, t, h)))
  return do, dl


def test_bwd_through_the_op_with_the_flag(monkeypatch):
  """sparse_mla(impl="pallas", interpret=True) takes the Triton backward when GPU_TRITON_KERNELS
  is on: the Mosaic forward (GPU interpreter) + Triton backward against the reference's vjp."""
  monkeypatch.setattr(ops, "GPU_TRITON_KERNELS", True)
  monkeypatch.setattr(ops, "TRITON_BLOCK_SIZES", SMALL)
  q, kv, idx = _case(1, 2, 16, 192, 30, 72, jnp.bfloat16, seed=3)
  f = lambda impl: (
    lambda q, kv: ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=128, impl=impl, interpret=True)
  )
  (o, lse), vjp = jax.vjp(f("pallas"), q, kv)
  (_, rl), rvjp = jax.vjp(f("reference"), q, kv)
  do, dl = _cts(1, 2, 16, 128, jnp.bfloat16, idx, q, kv)
  tol = 2 * _testing.tolerances(jnp.bfloat16)
  for g, rg in zip(vjp((do, dl)), rvjp((do, dl))):
    assert g.dtype == rg.dtype and _testing.rel_err(g, rg) < tol, _testing.rel_err(g, rg)
  jaxpr = str(jax.make_jaxpr(lambda q, kv: jax.vjp(f("pallas"), q, kv)[1]((do, dl)))(q, kv))
  assert "sparse_mla_bwd_dkv" in jaxpr


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_probs_interpret_matches_reference(monkeypatch, dtype):
  q, kv, idx = _case(2, 3, 20, 96, 40, 24, dtype, seed=5)
  lse = reference.sparse_mla_reference(q, kv, idx, scale=SCALE, d_v=64)[1]
  monkeypatch.setattr(ops, "TRITON_BLOCK_SIZES", SMALL)
  with jax.default_matmul_precision("highest"):
    got = ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE, impl="pallas", interpret=True)
    want = reference.sparse_mla_probs_reference(q, kv, idx, lse, scale=SCALE)
  assert got.shape == want.shape == idx.shape and got.dtype == jnp.float32
  atol = 1e-6 if dtype == jnp.float32 else 2e-3
  np.testing.assert_allclose(got, want, atol=atol)
  assert (np.asarray(got[0, 0]) == 0).all()
  valid = (np.asarray(idx) >= 0) & (np.asarray(idx) < 40)
  assert (np.asarray(got)[~valid] == 0).all()
  # without interpret and off the GPU the op is the reference (no pallas_call)
  jaxpr = str(jax.make_jaxpr(lambda: ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE))())
  assert "pallas_call" not in jaxpr


def test_block_sizes_validate():
  with pytest.raises(ValueError, match="block_k=24"):
    kernel_triton.BlockSizes(block_k=24)
  with pytest.raises(ValueError, match="block_h=8"):
    kernel_triton.BlockSizes(block_h=8)
  assert kernel_triton.split_dims(576, 512) == (512, 64)
  assert kernel_triton.split_dims(512, 512) == (512, 0)
  assert kernel_triton.split_dims(192, 80) == (128, 128)


def _export_cuda(f, *avals):
  mesh = jax.sharding.AbstractMesh(
    (),
    (),
    abstract_device=jax.sharding.AbstractDevice(
      device_kind="NVIDIA H100", platform="gpu", num_cores=132
    ),
  )
  with jax.sharding.use_abstract_mesh(mesh):
    return export.export(
      jax.jit(f),
      platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)],
    )(*avals)


def test_export_cuda_v32_shapes(monkeypatch):
  """The backward and the probabilities lower for cuda at V3.2 dims (128 heads, 576 = 512 + 64,
  k = 2048), every Triton module passing the MLIR verifier."""
  from jax._src.pallas.triton import pallas_call_registration as reg  # noqa: PLC0415

  verified, lower = [], reg.lowering.lower_jaxpr_to_triton_module

  def lower_and_verify(*a, **kw):
    out = lower(*a, **kw)
    verified.append(out.module.operation.verify())
    return out

  monkeypatch.setattr(reg.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
  b, t, s, h, k = 1, 256, 4096, 128, 2048
  sds = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  args = (
    sds((b, t, h, 576), bf),
    sds((b, s, 576), bf),
    sds((b, t, k), jnp.int32),
    sds((b, t, h, 512), bf),
    sds((b, t, h), jnp.float32),
    sds((b, t, h, 512), bf),
    sds((b, t, h), jnp.float32),
  )
  bwd = functools.partial(
    ops._bwd_triton, scale=SCALE, d_v=512, bsz=kernel_triton.BlockSizes(), interpret=False
  )
  exp = _export_cuda(bwd, *args)
  assert [a.shape for a in exp.out_avals] == [(b, t, h, 576), (b, s, 576)]
  assert exp.mlir_module().count(pltriton.CUSTOM_CALL_TARGET_NAME) == 2
  monkeypatch.setattr(ops, "GPU_TRITON_KERNELS", True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  probs = lambda q, kv, idx, lse: ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE, impl="pallas")
  exp = _export_cuda(probs, args[0], args[1], args[2], args[4])
  assert exp.mlir_module().count(pltriton.CUSTOM_CALL_TARGET_NAME) == 1
  assert verified == [True] * 3


def _on_gpu():
  if jax.default_backend() != "gpu":
    pytest.skip("needs an NVIDIA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("bsz", [kernel_triton.BlockSizes(), SMALL], ids=["default", "small"])
def test_gpu_bwd_and_probs_v32_dims(bsz):
  """On the GPU at V3.2 dims (128 heads, 576 / 512, k = 2048 with invalid ids and duplicates):
  the kernels' dq, dkv against autodiff of the f32 reference, and the probabilities within 1e-5
  absolute of the reference's."""
  _on_gpu()
  b, t, h, s, k = 2, 64, 128, 4096, 2048
  q, kv, idx = _case(b, t, h, 576, s, k, jnp.bfloat16, seed=11)
  do, dl = _cts(b, t, h, 512, jnp.bfloat16, idx, q, kv)
  with jax.default_matmul_precision("highest"):
    out, lse, (rq, rkv) = _ref_grads(q, kv, idx, do, dl, 512)
    want_p = reference.sparse_mla_probs_reference(
      q.astype(jnp.float32), kv.astype(jnp.float32), idx, lse, scale=SCALE
    )
  dq, dkv = jax.jit(functools.partial(ops._bwd_triton, scale=SCALE, d_v=512, bsz=bsz))(
    q, kv, idx, out.astype(jnp.bfloat16), lse, do, dl
  )
  tol = 2 * _testing.tolerances(jnp.bfloat16)
  assert _testing.rel_err(dq, rq) < tol, _testing.rel_err(dq, rq)
  assert _testing.rel_err(dkv, rkv) < tol, _testing.rel_err(dkv, rkv)
  qn, qr, kvn, kvr, gidx, hp = ops._triton_layout(q, kv, idx, 512, bsz)
  p = kernel_triton.sparse_mla_probs(
    qn, qr, ops._pad_heads(lse, hp, jnp.inf), kvn, kvr, gidx, scale=SCALE, h=h, block_sizes=bsz
  )
  p = p[:, :k].reshape(b, t, k)
  np.testing.assert_allclose(np.asarray(p), np.asarray(want_p), atol=1e-4)
