# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sparse MLA TPU (Mosaic) kernels: forward and jax.vjp gradients vs the reference under the TPU
interpreter (out-of-bounds reads raise, uninitialised memory is NaN), and cross-lowering for TPU
at the V3.2 shapes (real Mosaic lowering on a CPU host).

The interpreter costs ~13 ms per gathered row (three host callbacks), so shapes here are tiny.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _testing
from pallas_kernels.sparse_mla import kernel_tpu, ops

SCALE = 0.13
INTERPRET = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")


def _inputs(b, t, h, k_dim, s, k, dtype, seed=0, lo=-3, hi_extra=3):
  q = _testing.normal(seed, (b, t, h, k_dim), dtype)
  kv = _testing.normal(seed + 1, (b, s, k_dim), dtype)
  idx = jax.random.randint(jax.random.key(seed + 2), (b, t, k), lo, s + hi_extra, jnp.int32)
  return q, kv, idx


def _compare(f, rf, q, kv, seed, dtype=jnp.bfloat16):
  (o, l), vjp = jax.vjp(jax.jit(f), q, kv)
  (ro, rl), rvjp = jax.vjp(jax.jit(rf), q, kv)
  tol = _testing.tolerances(dtype)
  assert o.shape == ro.shape and o.dtype == ro.dtype and l.dtype == jnp.float32
  assert _testing.rel_err(o, ro) < tol, _testing.rel_err(o, ro)
  np.testing.assert_array_equal(np.isinf(l), np.isinf(rl))
  fin = np.isfinite(rl)
  np.testing.assert_allclose(np.asarray(l)[fin], np.asarray(rl)[fin], atol=2e-3, rtol=2e-3)
  do = _testing.normal(seed + 5, o.shape, o.dtype)
  dl = jnp.where(fin, _testing.normal(seed + 6, l.shape), 0.0)  # lse cotangent honoured too
  for g, rg in zip(vjp((do, dl)), rvjp((do, dl))):
    assert g.shape == rg.shape and g.dtype == rg.dtype
    assert np.isfinite(np.asarray(g, np.float32)).all()
    assert _testing.rel_err(g, rg) < 2 * tol, _testing.rel_err(g, rg)
  return o, l


def _ops(idx, d_v, impl, **kw):
  return lambda q, kv: ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=d_v, impl=impl, **kw)


def test_ops_dispatch_interpret_fwd_bwd():
  # via ops (backend="tpu"): k=200 -> 2 chunks of 128 slots (double-buffered gather and drows
  # write-back), 56 padded slots, invalid slots, duplicate slots, H and K padded (8 -> 16, 96 -> 128).
  q, kv, idx = _inputs(1, 1, 8, 96, 40, 200, jnp.bfloat16)
  idx = idx.at[0, 0, :6].set(3)
  f = _ops(idx, 64, "pallas", interpret=INTERPRET, backend="tpu")
  _compare(f, _ops(idx, 64, "reference"), q, kv, seed=0)


@pytest.mark.parametrize("dtype", [jnp.float32])
def test_many_queries_same_rows_token_chunks(dtype):
  # 2 batches x 2 tokens folded, 2 tokens per pallas_call (the scan over SMEM-sized chunks), all
  # selecting among 6 keys: dkv must sum every query's (and every duplicate slot's) contribution;
  # a fully invalid row gives out 0 and lse +inf.
  q, kv, idx = _inputs(2, 2, 16, 128, 6, 40, dtype, seed=3, lo=-1, hi_extra=0)
  idx = idx.at[1, 0].set(-1)
  bs = kernel_tpu.BlockSizes(block_k=128, tokens_per_call=2)
  f = lambda q, kv: kernel_tpu.sparse_mla_tpu(q, kv, idx, SCALE, 128, bs, INTERPRET)
  o, l = _compare(f, _ops(idx, 128, "reference"), q, kv, seed=3, dtype=dtype)
  assert np.isinf(l[1, 0]).all() and (np.asarray(o[1, 0]) == 0).all()


@pytest.mark.slow
def test_interpret_larger_bf16():
  # ragged everything: 3 batches, 2 tokens, 3 tokens per call (padded token chunk), k=300.
  q, kv, idx = _inputs(3, 2, 24, 200, 70, 300, jnp.bfloat16, seed=7)
  idx = idx.at[2, 1].set(-1)
  bs = kernel_tpu.BlockSizes(block_k=128, tokens_per_call=4)
  f = lambda q, kv: kernel_tpu.sparse_mla_tpu(q, kv, idx, SCALE, 136, bs, INTERPRET)
  _compare(f, _ops(idx, 136, "reference"), q, kv, seed=7)


def test_backend_and_dtype_errors():
  q, kv, idx = _inputs(1, 1, 8, 64, 16, 8, jnp.bfloat16)
  with pytest.raises(ValueError, match="backend"):
    ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=32, impl="pallas", backend="cuda")
  with pytest.raises(ValueError, match="bf16 or f32"):
    ops.sparse_mla(
      q.astype(jnp.float16),
      kv.astype(jnp.float16),
      idx,
      scale=SCALE,
      d_v=32,
      impl="pallas",
      backend="tpu",
    )
  with pytest.raises(ValueError, match="block_k"):
    kernel_tpu.BlockSizes(block_k=64)
  bs = kernel_tpu.BlockSizes.default_for(2048)
  assert bs.block_k == 256 and bs.smem_bytes(2048) <= 256 * 1024


def _export(fn, *args):
  return export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


def test_export_tpu_full_v32_shapes():
  """S1/S3 shapes (T=4096, S=32768, H=128, K=576, V=512, k=2048) lower through Mosaic TPU."""
  t, s, h, k_dim, d_v, k = 4096, 32768, 128, 576, 512, 2048
  sds = jax.ShapeDtypeStruct
  args = (sds((1, t, h, k_dim), jnp.bfloat16), sds((1, s, k_dim), jnp.bfloat16))
  idx = sds((1, t, k), jnp.int32)
  f = lambda q, kv, i: ops.sparse_mla(
    q, kv, i, scale=k_dim**-0.5, d_v=d_v, impl="pallas", backend="tpu"
  )

  def grads(q, kv, i):
    (o, l), vjp = jax.vjp(lambda q, kv: f(q, kv, i), q, kv)
    return vjp((o, jnp.ones_like(l)))

  assert "sparse_mla_fwd_tpu" in _export(f, *args, idx)
  mod = _export(grads, *args, idx)
  assert "sparse_mla_fwd_tpu" in mod and "sparse_mla_bwd_tpu" in mod


@pytest.mark.tpu
def test_on_tpu_fwd_bwd():
  q, kv, idx = _inputs(2, 64, 128, 576, 4096, 2048, jnp.bfloat16, lo=-8, hi_extra=8)
  f = lambda impl: lambda q, kv: ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=512, impl=impl)
  _compare(f("pallas"), f("reference"), q, kv, seed=0)
