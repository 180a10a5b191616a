# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The warm-up's dense attention with its f32 lse on one Hopper GPU (dense_attention/kernel_mgpu.py):
operand checks and the real Mosaic GPU lowering at V3.2's MHA shapes on CPU; on the GPU, out and
lse against the f32 chunked reference, the output's gradient, and the warm-up KL through
sparse_attention.warmup_attention against the cuDNN + own-lse path."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.gpu import attention_mgpu

from dsa_jax import sparse_attention
from pallas_kernels._testing import rel_err
from pallas_kernels.dense_attention import kernel_mgpu
from pallas_kernels.lightning_indexer import ops as indexer_ops

sds = jax.ShapeDtypeStruct


def test_supported():
  bf = jnp.bfloat16
  q, v = sds((1, 256, 4, 192), bf), sds((1, 256, 4, 128), bf)
  assert kernel_mgpu.supported(q, q, v) is None
  assert "T=200" in kernel_mgpu.supported(
    sds((1, 200, 4, 192), bf), sds((1, 200, 4, 192), bf), sds((1, 200, 4, 128), bf)
  )
  assert "head dims" in kernel_mgpu.supported(
    sds((1, 256, 4, 96), bf), sds((1, 256, 4, 96), bf), sds((1, 256, 4, 96), bf)
  )
  assert "dtypes" in kernel_mgpu.supported(q.update(dtype=jnp.float32), q, v)
  assert "one B,T,H" in kernel_mgpu.supported(q, sds((1, 512, 4, 192), bf), v)


def test_export_cuda_v32_shapes(monkeypatch):
  """The Mosaic GPU kernel's real lowering (SMEM budget, layouts) at V3.2's MHA form: 128 heads,
  K 192, V 128, T 4096. The CPU build has no CUDA runtime to ask for its version (the kernel
  refuses causal masking on CUDA 12.8.0-12.9.0); the device image has CUDA 13."""
  monkeypatch.setattr(
    attention_mgpu, "cuda_versions", types.SimpleNamespace(cuda_runtime_get_version=lambda: 13000)
  )
  t, h = 4096, 128
  q, v = sds((1, t, h, 192), jnp.bfloat16), sds((1, t, h, 128), jnp.bfloat16)
  exp = jax.export.export(jax.jit(kernel_mgpu.causal_attention_lse), platforms=["cuda"])(q, q, v)
  assert "mosaic_gpu" in exp.mlir_module()
  assert [(a.shape, a.dtype) for a in exp.out_avals] == [
    ((1, t, h, 128), jnp.bfloat16),
    ((1, t, h), jnp.float32),
  ]


def test_warmup_attention_elsewhere_is_dense_attention():
  """Off the GPU the warm-up attention is dense_attention, and the target's q and scale are the
  caller's."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 64, 2, d)), jnp.float32) for d in (32, 32, 16))
  out, lse, qt, st = sparse_attention.warmup_attention(
    q, k, v, scale=0.3, block_t=32, impl="pallas"
  )
  want, want_lse = sparse_attention.dense_attention(q, k, v, scale=0.3, block_t=32)
  assert qt is q and st == 0.3
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-6)


def _on_gpu():
  if jax.default_backend() != "gpu":
    pytest.skip("needs an NVIDIA GPU")


def _inputs(seed, t, h, dtype=jnp.bfloat16):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
  return f(1, t, h, 192), f(1, t, h, 192), f(1, t, h, 128)


@pytest.mark.gpu
def test_gpu_out_lse_and_grad_vs_reference():
  """out, lse (f32, natural log) and the output's gradient (cuDNN's backward) against the f32
  chunked reference on the same pre-scaled bf16 q."""
  _on_gpu()
  q, k, v = _inputs(0, 2048, 8)
  qs = kernel_mgpu.scaled_query(q, 192**-0.5)
  do = _inputs(1, 2048, 8)[2]
  f32 = lambda x: x.astype(jnp.float32)

  def run(fn, *xs):
    (o, l), vjp = jax.vjp(fn, *xs)
    return o, l, vjp((do.astype(o.dtype), jnp.zeros_like(l)))

  o, lse, g = jax.jit(lambda *x: run(kernel_mgpu.causal_attention_lse, *x))(qs, k, v)
  ref = lambda q, k, v: sparse_attention.dense_attention(q, k, v, scale=1.0, block_t=256)
  with jax.default_matmul_precision("highest"):
    ro, rl, rg = jax.jit(lambda *x: run(ref, *x))(f32(qs), f32(k), f32(v))
  assert lse.dtype == jnp.float32
  err = float(jnp.max(jnp.abs(lse - rl)))
  print(f"lse max abs err {err:.2e}, out rel err {rel_err(o, ro):.2e}")
  assert err < 2e-3
  assert rel_err(o, ro) < 1e-2
  for name, a, b in zip("qkv", g, rg):
    assert rel_err(a, b) < 2e-2, name


@pytest.mark.gpu
def test_gpu_warmup_kl_matches_cudnn_path():
  """The warm-up KL and its indexer gradients through warmup_attention (Mosaic kernel, lse from
  the attention) against the same with the kernel off (cuDNN, the KL kernels' own lse pass)."""
  _on_gpu()
  t, h, j, d = 2048, 16, 64, 128
  q, k, v = _inputs(2, t, h)
  rng = np.random.default_rng(3)
  iq = jnp.asarray(rng.standard_normal((1, t, j, d)), jnp.bfloat16)
  ik = jnp.asarray(rng.standard_normal((1, t, d)), jnp.bfloat16)
  iw = jnp.asarray(rng.standard_normal((1, t, j)) * 0.3, jnp.float32)
  scale = 192**-0.5

  def loss(iq, ik, iw):
    _, lse, qt, st = sparse_attention.warmup_attention(
      q, k, v, scale=scale, block_t=256, impl="pallas"
    )
    kl = indexer_ops.dense_kl(iq, ik, iw, qt, k, lse, attn_scale=st, impl="pallas")
    return jnp.mean(kl)

  got, got_g = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(iq, ik, iw)
  old = sparse_attention.GPU_WARMUP_ATTENTION_KERNEL
  try:
    sparse_attention.GPU_WARMUP_ATTENTION_KERNEL = False
    want, want_g = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(iq, ik, iw)
  finally:
    sparse_attention.GPU_WARMUP_ATTENTION_KERNEL = old
  print(f"kl {float(got):.6f} vs {float(want):.6f}")
  assert abs(float(got) - float(want)) <= 1e-2 * abs(float(want))
  for name, a, b in zip(("iq", "ik", "iw"), got_g, want_g):
    assert rel_err(a, b) < 3e-2, name
