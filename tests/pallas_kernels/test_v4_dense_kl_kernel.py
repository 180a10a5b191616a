# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""DeepSeek-V4 CSA warm-up KL on the dense-KL Pallas-Triton kernels (block-causal over compressed
entries, ratio m) against reference.v4_indexer_kl: interpret mode on CPU (value and gradients in
f32 and bf16, T not a multiple of m, rows that see no entry), the dispatch, and CUDA lowering at
V4-Flash-like shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _testing
from pallas_kernels.lightning_indexer import kernel_kl_triton
from pallas_kernels.v4_attention import ops

SMALL = kernel_kl_triton.BlockSizes(block_t=16, block_s=16, block_c=16)


def _case(b, t, m, j, d, h, k_dim, dtype, seed=0):
  u = t // m
  iq = _testing.normal(seed, (b, t, j, d), dtype)
  ik = _testing.normal(seed + 1, (b, u, d), dtype)
  iw = _testing.normal(seed + 2, (b, t, j), jnp.float32, scale=(j * d) ** -0.5)
  q = _testing.normal(seed + 3, (b, t, h, k_dim), dtype)
  ckv = _testing.normal(seed + 4, (b, u, k_dim), dtype)
  scale = k_dim**-0.5
  # The layer's lse covers the window and the sink too: the compressed entries' logsumexp plus
  # some extra mass (every row has a window, so rows that see no entry get a finite lse too).
  c = jnp.einsum("bthk,buk->bthu", q.astype(jnp.float32), ckv.astype(jnp.float32)) * scale
  vis = jnp.arange(u)[None, :] < ((jnp.arange(t) + 1) // m)[:, None]  # [T, U]
  lse_c = jax.nn.logsumexp(jnp.where(vis[None, :, None, :], c, -jnp.inf), axis=-1)
  extra = jax.nn.softplus(_testing.normal(seed + 5, (b, t, h)))
  lse = jnp.logaddexp(lse_c, extra)
  return iq, ik, iw, q, ckv, lse, scale


def _kl(impl, m, scale, **kw):
  def f(iq, ik, iw, q, ckv, lse):
    return ops.indexer_kl(iq, ik, iw, q, ckv, lse, ratio=m, scale=scale, impl=impl, **kw)

  return f


@pytest.mark.parametrize(
  "dtype,b,t,m,tol",
  [(jnp.float32, 2, 37, 4, 1e-5), (jnp.bfloat16, 1, 40, 4, 2e-2), (jnp.float32, 1, 20, 8, 1e-5)],
)
def test_interpret_matches_reference(dtype, b, t, m, tol):
  iq, ik, iw, q, ckv, lse, scale = _case(b, t, m, 4, 16, 4, 48, dtype)
  ct = _testing.normal(9, (b, t))
  kern = _kl("pallas", m, scale, interpret=True, block_sizes=SMALL)
  ref = _kl("reference", m, scale)

  def vg(f):
    kl, vjp = jax.vjp(lambda a, b_, c: f(a, b_, c, q, ckv, lse), iq, ik, iw)
    return kl, vjp(ct)

  with jax.default_matmul_precision("highest"):
    (kl, grads), (rkl, rgrads) = vg(kern), vg(ref)
  assert _testing.rel_err(kl, rkl) < tol, _testing.rel_err(kl, rkl)
  for g, rg in zip(grads, rgrads):
    assert g.dtype == rg.dtype and np.isfinite(np.asarray(g, np.float32)).all()
    assert _testing.rel_err(g, rg) < tol, _testing.rel_err(g, rg)
  # rows before the first complete block see no entry: KL 0 and no gradient
  first = m - 1
  assert (np.asarray(kl[:, :first]) == 0).all()
  assert (np.asarray(grads[0][:, :first], np.float32) == 0).all()


def test_dispatch():
  iq, ik, iw, q, ckv, lse, scale = _case(1, 24, 4, 4, 16, 4, 48, jnp.float32)
  args = (iq, ik, iw, q, ckv, lse)

  def jaxpr(**kw):
    return str(jax.make_jaxpr(lambda *a: ops.indexer_kl(*a, ratio=4, scale=scale, **kw))(*args))

  assert "pallas_call" in jaxpr(impl="pallas", interpret=True, block_sizes=SMALL)
  assert "pallas_call" not in jaxpr(impl="pallas")  # CPU without interpret: the reference
  idx = jnp.zeros((1, 24, 2), jnp.int32)  # the sparse stage: the sparse-KL kernels
  assert "pallas_call" in jaxpr(impl="pallas", interpret=True, idx=idx)  # (test_sparse_kl_kernel)
  # T < m: no entry exists; the kernels are not called and the KL is 0
  z = ops.indexer_kl(
    iq[:, :3],
    ik[:, :0],
    iw[:, :3],
    q[:, :3],
    ckv[:, :0],
    lse[:, :3],
    ratio=4,
    scale=scale,
    impl="pallas",
    interpret=True,
  )
  assert z.shape == (1, 3) and (np.asarray(z) == 0).all()
  with pytest.raises(ValueError, match="attn_lse"):
    kernel_kl_triton.dense_kl_fwd(
      iq, ik, iw, q, ckv, None, attn_scale=scale, block_sizes=SMALL, interpret=True, ratio=4
    )


def test_export_cuda_v4_flash_shapes():
  """Value and gradient of the CSA warm-up KL at V4-Flash-like shapes (T = 8192, m = 4, 64
  indexer heads x 128, 64 attention heads x 512) lower for cuda: the fwd, dq and dk kernels (the
  layer's lse is given, so no lse kernel)."""
  t, m, j, d, h, k_dim = 8192, 4, 64, 128, 64, 512
  u = t // m
  sds = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  args = (
    sds((1, t, j, d), bf),
    sds((1, u, d), bf),
    sds((1, t, j), jnp.float32),
    sds((1, t, h, k_dim), bf),
    sds((1, u, k_dim), bf),
    sds((1, t, h), jnp.float32),
  )

  def loss(iq, ik, iw, q, ckv, lse):
    kl = ops.indexer_kl(iq, ik, iw, q, ckv, lse, ratio=m, scale=k_dim**-0.5, impl="pallas")
    return jnp.sum(kl)

  import unittest.mock as mock  # noqa: PLC0415

  with mock.patch.object(ops, "_dense_kl_kernels", lambda *a: True):
    exp = _testing.export_cuda(jax.value_and_grad(loss, (0, 1, 2)), *args)
  assert exp.mlir_module().count(pltriton.CUSTOM_CALL_TARGET_NAME) == 3
  assert [a.shape for a in exp.out_avals] == [(), (1, t, j, d), (1, u, d), (1, t, j)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_gpu_matches_reference(dtype, tol):
  """On the GPU (the default BlockSizes), T = 2048, m = 4, V4 dims: KL and gradients against the
  f32 reference."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs an NVIDIA GPU")
  iq, ik, iw, q, ckv, lse, scale = _case(1, 2048, 4, 64, 128, 64, 512, dtype, seed=3)
  ct = _testing.normal(9, (1, 2048))
  f32 = lambda x: x.astype(jnp.float32)

  def vg(impl, args):
    kl, vjp = jax.vjp(
      lambda a, b_, c: ops.indexer_kl(a, b_, c, *args, ratio=4, scale=scale, impl=impl), iq, ik, iw
    )
    return kl, vjp(ct)

  kl, grads = jax.jit(lambda: vg("pallas", (q, ckv, lse)))()
  with jax.default_matmul_precision("highest"):
    rkl, rgrads = jax.jit(lambda: vg("reference", (f32(q), f32(ckv), lse)))()
  assert _testing.rel_err(kl, rkl) < tol, _testing.rel_err(kl, rkl)
  for g, rg in zip(grads, rgrads):
    assert _testing.rel_err(g, rg) < tol, _testing.rel_err(g, rg)
