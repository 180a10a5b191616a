# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The Mosaic GPU sparse-MLA backward (kernel_mosaic_gpu_bwd.py, GpuConfig(bwd="kernel")): in the
GPU interpreter on CPU vs autodiff of the reference and vs the blocked XLA backward (both
cotangents nonzero; ids < 0 and >= S, repeats inside a row and across tokens, a row with no valid
slot, padded heads and slots, two head blocks, several scan steps); the real Mosaic GPU lowering
at the V3.2 shapes. The GPU run is test_sparse_mla.py::test_pallas_gpu_grads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels.sparse_mla import kernel_mosaic_gpu, kernel_mosaic_gpu_bwd, ops

SCALE = 0.13
KERNEL = ops.GpuConfig(bwd="kernel", bwd_block_t=2)  # steps of 2 tokens: the scan pads and loops


def _inputs(b, t, h, k_dim, s, k, dtype, seed=0):
  q = _testing.normal(seed, (b, t, h, k_dim), dtype)
  kv = _testing.normal(seed + 1, (b, s, k_dim), dtype)
  idx = jax.random.randint(jax.random.key(seed + 2), (b, t, k), -3, s + 3, jnp.int32)
  idx = idx.at[0, 0].set(-1)  # a row with no valid slot
  idx = idx.at[-1, -1, : min(k, 5)].set(1)  # a repeat inside one row ...
  return q, kv, idx.at[0, -1, : min(k, 3)].set(1)  # ... and across tokens


def _check(b, t, h, k_dim, d_v, s, k, dtype, seed=0):
  """Kernel (interpreter) grads vs autodiff of the reference and vs the XLA backward."""
  q, kv, idx = _inputs(b, t, h, k_dim, s, k, dtype, seed=seed)
  tol = 2 * _testing.tolerances(dtype)

  def run(impl, config):
    f = lambda q, kv: ops.sparse_mla(
      q, kv, idx, scale=SCALE, d_v=d_v, impl=impl, interpret=True, config=config
    )
    (o, l), vjp = jax.vjp(f, q, kv)
    do = _testing.normal(seed + 5, o.shape, dtype)
    dl = jnp.where(jnp.isfinite(l), _testing.normal(seed + 6, l.shape), 0.0)  # nonzero dlse
    return vjp((do, dl))

  grads = run("pallas", KERNEL)
  xla = run("pallas", ops.GpuConfig(bwd="xla"))
  ref = run("reference", None)
  for g, x, r in zip(grads, xla, ref):
    assert g.shape == r.shape and g.dtype == r.dtype
    assert np.isfinite(np.asarray(g, np.float32)).all()
    assert _testing.rel_err(g, r) < tol, (_testing.rel_err(g, r), _testing.rel_err(x, r))
    assert _testing.rel_err(g, x) < tol
  # Rows that no valid slot selects get exactly zero; the all-invalid row's dq is zero.
  valid = (idx >= 0) & (idx < s)
  hit = np.zeros((b, s), bool)
  for bi in range(b):
    hit[bi, np.asarray(idx[bi])[np.asarray(valid[bi])]] = True
  assert (np.asarray(grads[1], np.float32)[~hit] == 0).all()
  assert (np.asarray(grads[0][0, 0], np.float32) == 0).all()


def test_interpret_bf16():
  # H 48 (-> 64), k 72 (-> 2 chunks, the second half padding), k > S, Kp 192 = 3 column tiles
  # (one dq tile per warpgroup), d_v 80 (-> 128), B 2: 4 tokens in scan steps of 2.
  _check(b=2, t=2, h=48, k_dim=192, d_v=80, s=40, k=72, dtype=jnp.bfloat16)


def test_interpret_two_head_blocks():
  # H 72 -> 128: two head blocks, so `a` takes each block's dS and P tiles at their own rows;
  # Kp = d_out = 128 (two dq tiles: WG2 owns none), one chunk; 3 tokens (a padded scan step).
  _check(b=1, t=3, h=72, k_dim=64, d_v=64, s=30, k=64, dtype=jnp.float16, seed=3)


@pytest.mark.slow
def test_interpret_v32_dims():
  # The V3.2 row: Kp 576 = 9 tiles (dq 3 + 3 + 3), d_out 512, 64 heads.
  _check(b=1, t=2, h=64, k_dim=576, d_v=512, s=50, k=128, dtype=jnp.bfloat16, seed=1)


def test_layout_and_config_errors():
  assert kernel_mosaic_gpu_bwd.tile_owners(9) == ((0, 1, 2), (3, 4, 5), (6, 7, 8))
  assert kernel_mosaic_gpu_bwd.tile_owners(2) == ((0,), (1,), ())
  # V3.2: q, dO and R tiles + P, dS + ids/mbarriers fit the 227 KiB opt-in maximum; Kp 640 not.
  assert kernel_mosaic_gpu_bwd.fits(576, 512) and not kernel_mosaic_gpu_bwd.fits(640, 512)
  x = jnp.zeros((2, 64, 128), jnp.bfloat16)
  lse = jnp.zeros((2, 64), jnp.float32)
  with pytest.raises(ValueError, match="bad kernel layout"):
    kernel_mosaic_gpu_bwd.sparse_mla_bwd(
      x, x[0], jnp.zeros((2, 64), jnp.int32), x[..., :64], lse, lse, scale=1.0
    )
  with pytest.raises(ValueError, match="bwd='bogus'"):
    ops.GpuConfig(bwd="bogus")
  # a WG's dq tiles are one wgmma (N <= 256: 4 tiles), so Kp 832 (5 + 4 + 4 tiles) is refused
  wide = jnp.zeros((2, 64, 832), jnp.bfloat16)
  with pytest.raises(ValueError, match="Kp <= 768"):
    kernel_mosaic_gpu_bwd.sparse_mla_bwd(
      wide,
      wide[0],
      jnp.zeros((2, 64), jnp.int32),
      wide[..., :512],
      lse,
      lse,
      scale=1.0,
      interpret=True,
    )
  # likewise the forward's P·V over d_out / 2 columns: d_out 640 is refused by name
  with pytest.raises(ValueError, match="at most 512 value columns"):
    kernel_mosaic_gpu.sparse_mla_fwd(
      wide,
      wide[0],
      jnp.zeros((2, 64), jnp.int32),
      scale=1.0,
      d_out=640,
      config=ops.GpuConfig(),
      interpret=True,
    )
  # Kp 640: neither the forward's nor the backward kernel's tiles fit, so the custom VJP's
  # backward rule is called on its own.
  q = jnp.zeros((1, 2, 8, 640), jnp.bfloat16)
  idx = jnp.zeros((1, 2, 8), jnp.int32)
  res = (q, q[:, :, 0], idx, q[..., :512], jnp.zeros((1, 2, 8)))
  cts = (jnp.zeros((1, 2, 8, 512), jnp.bfloat16), jnp.zeros((1, 2, 8)))
  config = ops.GpuConfig(bwd="kernel")
  with pytest.raises(ValueError, match="bwd='kernel'.*SMEM"):
    ops._sparse_mla_gpu_bwd(SCALE, 512, True, config, res, cts)


@pytest.mark.parametrize("batch", [1, 2])
def test_cross_lowering_cuda_v32(batch, triton_verified):
  """The kernel's real Mosaic GPU lowering (SMEM budget, layouts, the TMA stores of the [dS; P]
  tiles, the inline cp.async gather) at V3.2 shapes, with the dK product and the segment sum."""
  t, s, h, k_dim, d_v, k = 4096 // batch, 32768 // batch, 128, 576, 512, 2048
  sds = jax.ShapeDtypeStruct
  q, kv = sds((batch, t, h, k_dim), jnp.bfloat16), sds((batch, s, k_dim), jnp.bfloat16)
  config = ops.GpuConfig(bwd="kernel")
  fwd = functools.partial(ops.sparse_mla, scale=SCALE, d_v=d_v, impl="pallas", config=config)

  def fwd_bwd(q, kv, idx, do):
    (_, _), vjp = jax.vjp(lambda q, kv: fwd(q, kv, idx), q, kv)
    return vjp((do, jnp.zeros((batch, t, h), jnp.float32)))

  exp = _testing.export_cuda(
    fwd_bwd, q, kv, sds((batch, t, k), jnp.int32), sds((batch, t, h, d_v), jnp.bfloat16)
  )
  mlir = exp.mlir_module()
  assert "sparse_mla_bwd_kernel" in mlir and "segment_sum_rows" in mlir
  assert triton_verified == [True]
  assert kernel_mosaic_gpu.padded_dims(k_dim, d_v, k) == (576, 512, 2048)


def test_smem_bytes_exact(monkeypatch):
  """smem_bytes (what `fits` and GpuConfig.default_for decide by) is what Mosaic GPU asks for at
  V3.2 dims (its own sum of the buffers, each rounded up to whole KiB, and the barriers), under
  the 227 KiB opt-in maximum, and the same at k 2048 and 4096."""
  sizes = _testing.record_smem_sizes(monkeypatch)
  if sizes is None:
    pytest.skip("this Mosaic GPU does not size SMEM in _smem_tree_size")
  sds = jax.ShapeDtypeStruct
  n, hp, kp_dim, d_out = 4, 128, 576, 512
  bf16, f32 = jnp.bfloat16, jnp.float32
  for k in (2048, 4096):
    args = (
      sds((n, hp, kp_dim), bf16),
      sds((4096, kp_dim), bf16),
      sds((n, k), jnp.int32),
      sds((n, hp, d_out), bf16),
      sds((n, hp), f32),
      sds((n, hp), f32),
    )
    _testing.export_cuda(lambda *a: kernel_mosaic_gpu_bwd.sparse_mla_bwd(*a, scale=SCALE), *args)
  assert sizes == 2 * [kernel_mosaic_gpu_bwd.smem_bytes(kp_dim, d_out, 2)]
  assert sizes[0] <= kernel_mosaic_gpu._SMEM_BYTES
