# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The Mosaic GPU sparse-MLA kernels (forward, backward, probabilities) skip the chunks after a
token's last valid slot (_common.live_chunks): top-k's layout, valid ids first and -1
after, as a causal prefix gives it. Checked against the reference in the GPU interpreter on CPU
(tokens with 0, 1, 64, 65, 130 and all 256 valid slots, one with an invalid gap before a late
valid slot), and at V3.2 dims on the GPU (`-m gpu`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _common, _testing
from pallas_kernels.sparse_mla import ops, reference

SCALE = 0.13


def test_live_chunks_counts():
  idx = -jnp.ones((6, 256), jnp.int32)
  for row, n in enumerate([0, 1, 64, 65, 130]):
    idx = idx.at[row, :n].set(7)
  idx = idx.at[5, 200].set(3)  # one late valid slot after invalid chunks
  np.testing.assert_array_equal(_common.live_chunks(idx, 64), [1, 1, 1, 2, 3, 4])
  np.testing.assert_array_equal(_common.live_chunks(idx, 64, 2), [2, 2, 2, 2, 4, 4])


def _prefix_inputs(b, t, h, k_dim, s, k, counts, seed=0):
  """q, kv and ids whose rows hold counts[i] distinct ascending valid ids, then -1 (top-k's
  layout); the last row also gets one valid id late in the row, after invalid chunks."""
  q = _testing.normal(seed, (b, t, h, k_dim), jnp.bfloat16)
  kv = _testing.normal(seed + 1, (b, s, k_dim), jnp.bfloat16)
  rng = np.random.default_rng(seed)
  idx = -np.ones((b, t, k), np.int32)
  for bi in range(b):
    for ti, n in enumerate(counts):
      idx[bi, ti, :n] = np.sort(rng.choice(s, size=n, replace=False))
  idx[:, -1, k - 20] = 5
  return q, kv, jnp.asarray(idx)


COUNTS = [0, 1, 64, 65, 130, 12]  # of k = 256 slots: 4 chunks


def test_interpret_prefix_ids_fwd_bwd_probs():
  b, t, h, k_dim, d_v, s, k = 1, 6, 20, 64, 48, 300, 256
  q, kv, idx = _prefix_inputs(b, t, h, k_dim, s, k, COUNTS)
  tol = _testing.tolerances(jnp.bfloat16)

  def f(impl):
    return lambda q, kv: ops.sparse_mla(
      q, kv, idx, scale=SCALE, d_v=d_v, impl=impl, interpret=True, config=ops.GpuConfig()
    )

  (o, lse), vjp = jax.vjp(f("pallas"), q, kv)
  (ro, rlse), rvjp = jax.vjp(f("reference"), q, kv)
  assert _testing.rel_err(o, ro) < tol
  fin = np.isfinite(rlse)
  np.testing.assert_array_equal(np.isfinite(lse), fin)
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(rlse)[fin], atol=2e-3, rtol=2e-3)
  assert (np.asarray(o[0, 0], np.float32) == 0).all()  # the row with no valid slot

  do = _testing.normal(5, o.shape, jnp.bfloat16)
  dl = jnp.where(fin, _testing.normal(6, lse.shape), 0.0)
  grads = vjp((do, dl))
  for g, rg in zip(grads, rvjp((do, dl))):
    assert np.isfinite(np.asarray(g, np.float32)).all()
    assert _testing.rel_err(g, rg) < 2 * tol, _testing.rel_err(g, rg)

  p = ops.sparse_mla_probs(q, kv, idx, rlse, scale=SCALE, impl="pallas", interpret=True)
  with jax.default_matmul_precision("highest"):
    want = reference.sparse_mla_probs_reference(q, kv, idx, rlse, scale=SCALE)
  np.testing.assert_allclose(p, want, atol=1e-5)
  assert (np.asarray(p)[np.asarray(idx) < 0] == 0).all()  # skipped chunks too


def test_cross_lowering_cuda_reads_the_counts(monkeypatch):
  """The three kernels lower for CUDA with the per-token chunk counts as an input."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  sds = jax.ShapeDtypeStruct
  q, kv = sds((1, 256, 128, 576), jnp.bfloat16), sds((1, 4096, 576), jnp.bfloat16)
  idx, lse = sds((1, 256, 2048), jnp.int32), sds((1, 256, 128), jnp.float32)

  def fwd_bwd_probs(q, kv, idx, lse):
    f = lambda q, kv: ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=512, impl="pallas")
    (o, l), vjp = jax.vjp(f, q, kv)
    p = ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE, impl="pallas")
    return vjp((o, l)), p

  mlir = _testing.export_cuda(fwd_bwd_probs, q, kv, idx, lse).mlir_module()
  for name in ("sparse_mla_fwd_kernel", "sparse_mla_bwd_kernel", "sparse_mla_probs_kernel"):
    assert name in mlir


@pytest.mark.gpu
def test_gpu_prefix_ids_v32_dims():
  if jax.default_backend() != "gpu":
    pytest.skip("needs an NVIDIA GPU")
  b, t, h, k_dim, d_v, s, k = 1, 8, 128, 576, 512, 4096, 2048
  counts = [0, 1, 64, 65, 700, 2047, 2048, 30]
  q, kv, idx = _prefix_inputs(b, t, h, k_dim, s, k, counts, seed=2)
  f = lambda impl: lambda q, kv: ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=d_v, impl=impl)
  (o, lse), vjp = jax.vjp(f("pallas"), q, kv)
  with jax.default_matmul_precision("highest"):
    (ro, rlse), rvjp = jax.vjp(f("reference"), q.astype(jnp.float32), kv.astype(jnp.float32))
  assert _testing.rel_err(o, ro) < 5e-3
  do = _testing.normal(5, o.shape, jnp.bfloat16)
  dl = jnp.where(jnp.isfinite(rlse), _testing.normal(6, lse.shape), 0.0)
  with jax.default_matmul_precision("highest"):
    rgrads = rvjp((do.astype(jnp.float32), dl))
  for g, rg in zip(vjp((do, dl)), rgrads):
    assert _testing.rel_err(g, rg) < 5e-3, _testing.rel_err(g, rg)
  p = ops.sparse_mla_probs(q, kv, idx, lse, scale=SCALE, impl="pallas")
  with jax.default_matmul_precision("highest"):
    want = reference.sparse_mla_probs_reference(q, kv, idx, lse, scale=SCALE)
  np.testing.assert_allclose(p, want, atol=1e-5)
  assert (np.asarray(p)[np.asarray(idx) < 0] == 0).all()


def test_tpu_interpret_prefix_ids_fwd_bwd():
  """The TPU kernels skip the same trailing chunks (128-slot chunks at this k): rows with 0, 1 and
  129 valid slots, and one with a valid slot two chunks after its last full one. The interpreter
  fills memory nobody wrote with NaN, so the backward's unwritten per-slot rows of skipped chunks
  must be dropped, not summed."""
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

  b, t, h, k_dim, d_v, s, k = 1, 4, 8, 96, 64, 400, 384
  q, kv, idx = _prefix_inputs(b, t, h, k_dim, s, k, [0, 1, 129, 12])
  interpret = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")
  tol = _testing.tolerances(jnp.bfloat16)

  def f(impl, **kw):
    return lambda q, kv: ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=d_v, impl=impl, **kw)

  (o, lse), vjp = jax.vjp(f("pallas", interpret=interpret, backend="tpu"), q, kv)
  (ro, rlse), rvjp = jax.vjp(f("reference"), q, kv)
  assert _testing.rel_err(o, ro) < tol
  fin = np.isfinite(rlse)
  np.testing.assert_array_equal(np.isfinite(lse), fin)
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(rlse)[fin], atol=2e-3, rtol=2e-3)
  do = _testing.normal(5, o.shape, jnp.bfloat16)
  dl = jnp.where(fin, _testing.normal(6, lse.shape), 0.0)
  for g, rg in zip(vjp((do, dl)), rvjp((do, dl))):
    assert np.isfinite(np.asarray(g, np.float32)).all()
    assert _testing.rel_err(g, rg) < 2 * tol, _testing.rel_err(g, rg)
