# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sparse MLA: reference vs a naive dense masked softmax; the GPU kernel set (the Mosaic GPU
forward; blocked XLA backward whose dkv is summed by the sort + Pallas-Triton segment sum) vs the
reference in the GPU and Triton interpreters (forward and jax.vjp gradients with both
cotangents), cross-lowering for CUDA at the V3.2 shapes, and `-m gpu` runs on an NVIDIA Hopper
GPU."""

import functools
import types

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels.sparse_mla import kernel_mosaic_gpu, kernel_mosaic_gpu_bwd, ops, reference

SCALE = 0.13
GpuConfig = kernel_mosaic_gpu.GpuConfig


def _naive(q, kv, idx, scale, d_v):
  """Dense softmax over all S keys with a membership mask (counts duplicates like the gather)."""
  s = kv.shape[1]
  valid = (idx >= 0) & (idx < s)
  # count[b,t,j]: how many slots of row t select key j (a duplicate weighs twice, as in the gather)
  count = jnp.sum(jax.nn.one_hot(jnp.where(valid, idx, s), s + 1)[..., :s], axis=2)
  logits = jnp.einsum("bthc,bsc->bths", q.astype(jnp.float32), kv.astype(jnp.float32)) * scale
  w = count[:, :, None, :] * jnp.exp(logits - jnp.max(logits, -1, keepdims=True))
  denom = jnp.sum(w, -1, keepdims=True)
  out = jnp.einsum(
    "bths,bsv->bthv", w / jnp.maximum(denom, 1e-30), kv[..., :d_v].astype(jnp.float32)
  )
  lse = jnp.where(denom[..., 0] > 0, jnp.log(denom[..., 0]) + jnp.max(logits, -1), jnp.inf)
  return out, lse


def _inputs(b, t, h, k_dim, s, k, dtype, seed=0, lo=-3, hi_extra=3):
  q = _testing.normal(seed, (b, t, h, k_dim), dtype)
  kv = _testing.normal(seed + 1, (b, s, k_dim), dtype)
  idx = jax.random.randint(jax.random.key(seed + 2), (b, t, k), lo, s + hi_extra, jnp.int32)
  return q, kv, idx


@pytest.mark.parametrize("k", [8, 40])  # 40 >= S: every key selected, with repeats
def test_reference_matches_naive(k):
  q, kv, idx = _inputs(2, 5, 3, 16, 24, k, jnp.float32)
  idx = idx.at[0, 2].set(-1)  # a fully invalid row
  idx = idx.at[1, 0, :4].set(7)  # duplicates
  out, lse = reference.sparse_mla_reference(q, kv, idx, scale=SCALE, d_v=12, block_t=2)
  n_out, n_lse = _naive(q, kv, idx, SCALE, 12)
  np.testing.assert_allclose(out, n_out, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(n_lse))
  assert np.isinf(lse[0, 2]).all() and (np.asarray(out[0, 2]) == 0).all()
  fin = np.isfinite(n_lse)
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(n_lse)[fin], atol=1e-5, rtol=1e-5)


def test_reference_probs_sum_to_one():
  q, kv, idx = _inputs(1, 4, 3, 16, 24, 8, jnp.float32, lo=0, hi_extra=0)
  _, lse = reference.sparse_mla_reference(q, kv, idx, scale=SCALE, d_v=12)
  p = reference.sparse_mla_probs_reference(q, kv, idx, lse, scale=SCALE)
  np.testing.assert_allclose(jnp.sum(p, -1), 1.0, rtol=1e-5)


def test_config_validate_and_default_for():
  with pytest.raises(ValueError, match="bwd_block_t"):
    GpuConfig(bwd_block_t=0)
  with pytest.raises(ValueError, match="bwd='bogus'"):
    GpuConfig(bwd="bogus")
  cpu = jax.devices("cpu")[0]
  # the forward has no settings: any top-k gives the default (the slot ids are staged per chunk)
  for k in (64, 2048, 2305, 4096, 16448):
    assert GpuConfig.default_for((576, 512, k), cpu) == GpuConfig(), k
  # the backward kernel where its q, dO, row, P and dS tiles fit in SMEM; else the XLA backward
  assert GpuConfig().bwd == "kernel" and GpuConfig.default_for((64, 32, 2048), cpu).bwd == "kernel"
  assert GpuConfig.default_for((640, 512, 2048), cpu).bwd == "xla"
  # a GPU must be a Hopper
  ampere = types.SimpleNamespace(platform="gpu", compute_capability="8.0")
  with pytest.raises(ValueError, match="Hopper"):
    GpuConfig.default_for((576, 512, 2048), ampere)
  hopper = types.SimpleNamespace(platform="gpu", compute_capability="9.0")
  assert GpuConfig.default_for((576, 512, 2048), hopper) == GpuConfig()
  # 3 warpgroups launched with 168 registers each: 2 compute x 216 (64 x 64 logits and P + the
  # 64 x 256 accumulator) + the copy warpgroup's 72 fit in that pool
  compute, copy = GpuConfig().registers
  assert (compute, copy) == (216, 72) and 2 * compute + copy <= 3 * 168
  # the backward's split of the same pool (setmaxnreg takes multiples of 8 in [24, 256])
  compute, copy = kernel_mosaic_gpu_bwd.REGISTERS
  assert 2 * compute + copy <= 3 * 168 and compute > 168
  assert all(r % 8 == 0 and 24 <= r <= 256 for r in (compute, copy))
  # an SMEM budget independent of k; V3.2's Kp 576 fits, 640 does not
  assert kernel_mosaic_gpu.smem_bytes(576, 2) == 226 * 1024 + 112
  assert kernel_mosaic_gpu.fits(576) and not kernel_mosaic_gpu.fits(640)


def test_stand_in_rows_of_invalid_slots():
  """An invalid slot fetches row min(position, R - 1) (spread over the chunk, in range even when
  R is smaller than the chunk); valid ids are fetched as they are."""
  ids = jnp.array([5, -1, -1, 0, -7, 2], jnp.int32)
  got = [int(kernel_mosaic_gpu.stand_in_row(r, p, 4)) for p, r in enumerate(ids)]
  assert got == [5, 1, 2, 0, 3, 2]
  assert int(kernel_mosaic_gpu.stand_in_row(jnp.int32(-1), 63, 10_000)) == 63


def test_backward_steps_are_balanced():
  # steps of at most block_t tokens, evened out: never more steps than block_t needs, and the
  # last step's padding below one token per step
  assert ops.balanced_step(1536, 1024) == 768
  assert ops.balanced_step(4096, 1024) == 1024 and ops.balanced_step(4096, 1536) == 1366
  assert ops.balanced_step(3, 1024) == 3 and ops.balanced_step(3, 2) == 2
  for t in range(1, 300, 7):
    for bt in (1, 5, 64, 128):
      step = ops.balanced_step(t, bt)
      n = -(-t // step)
      assert step <= bt and n == -(-t // bt) and n * step - t < n, (t, bt, step)


def test_pallas_shape_errors():
  q, kv, idx = _inputs(1, 2, 64, 64, 16, 8, jnp.bfloat16)
  with pytest.raises(ValueError, match="bf16 or f16"):
    ops.sparse_mla(q.astype(jnp.float32), kv, idx, scale=SCALE, d_v=32, impl="pallas")
  with pytest.raises(ValueError, match="d_v"):
    ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=65, impl="pallas")
  with pytest.raises(ValueError, match="impl"):
    ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=32, impl="triton")
  with pytest.raises(ValueError, match="takes a GpuConfig"):
    ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=32, impl="pallas", config="direct")


def test_over_the_smem_budget_raises():
  """A row dim whose tiles do not fit in SMEM (Kp 640) raises, in one line; a d_out that is not
  a multiple of 128 is a bad layout."""
  sds = jax.ShapeDtypeStruct
  q, kv = sds((1, 4, 128, 640), jnp.bfloat16), sds((1, 8192, 640), jnp.bfloat16)
  idx = sds((1, 4, 2048), jnp.int32)
  fwd = functools.partial(ops.sparse_mla, scale=SCALE, d_v=512, impl="pallas")
  with pytest.raises(ValueError) as e:
    jax.eval_shape(fwd, q, kv, idx)
  need = kernel_mosaic_gpu.smem_bytes(640, 2)
  assert (
    str(e.value).splitlines()[0] == f"the forward needs {need} of 232448 bytes of SMEM at Kp=640"
  )
  with pytest.raises(ValueError, match="d_out=192"):
    x = jnp.zeros((2, 64, 128), jnp.bfloat16)
    kernel_mosaic_gpu.sparse_mla_fwd(
      x, x[0], jnp.zeros((2, 64), jnp.int32), scale=1.0, d_out=192, config=GpuConfig()
    )


def _check_fwd_bwd(b, t, h, k_dim, d_v, s, k, seed=0, grads=True, config=None):
  q, kv, idx = _inputs(b, t, h, k_dim, s, k, jnp.bfloat16, seed=seed)
  idx = idx.at[0, 0].set(-1)  # fully invalid row
  idx = idx.at[-1, -1, : min(k, 5)].set(1)  # duplicates
  tol = _testing.tolerances(jnp.bfloat16)
  f = lambda impl: (
    lambda q, kv: ops.sparse_mla(
      q, kv, idx, scale=SCALE, d_v=d_v, impl=impl, interpret=True, config=config
    )
  )
  (o, l), vjp = jax.vjp(f("pallas"), q, kv)
  (ro, rl), rvjp = jax.vjp(f("reference"), q, kv)
  assert o.shape == ro.shape and o.dtype == ro.dtype and l.dtype == jnp.float32
  assert _testing.rel_err(o, ro) < tol
  np.testing.assert_array_equal(np.isinf(l), np.isinf(rl))
  assert np.isinf(l[0, 0]).all() and (np.asarray(o[0, 0], np.float32) == 0).all()
  fin = np.isfinite(rl)
  np.testing.assert_allclose(np.asarray(l)[fin], np.asarray(rl)[fin], atol=2e-3, rtol=2e-3)
  if grads:
    do = _testing.normal(seed + 5, o.shape, jnp.bfloat16)
    dl = jnp.where(fin, _testing.normal(seed + 6, l.shape), 0.0)  # lse cotangent honoured too
    grads = vjp((do, dl))
    for g, rg in zip(grads, rvjp((do, dl))):
      assert g.shape == rg.shape and g.dtype == rg.dtype
      assert _testing.rel_err(g, rg) < 2 * tol, _testing.rel_err(g, rg)
    # Keys that no valid slot selects get exactly zero; the all-invalid row's dq is zero.
    hit = np.zeros((b, s), bool)
    for bi in range(b):
      ids = np.asarray(idx[bi]).reshape(-1)
      hit[bi, ids[(ids >= 0) & (ids < s)]] = True
    assert (np.asarray(grads[1], np.float32)[~hit] == 0).all()
    assert (np.asarray(grads[0][0, 0], np.float32) == 0).all()


def test_pallas_interpret_fwd_bwd():
  # ragged k (72 -> 128 slots, padded with invalid ones), k > S, ids < 0 and >= S, duplicates,
  # a fully masked row, d_v=80 (-> 128 output columns), H < 64, B = 2, Kp = 3 column tiles.
  _check_fwd_bwd(b=2, t=2, h=48, k_dim=192, d_v=80, s=40, k=72)


def test_pallas_interpret_chunks_and_head_blocks():
  """5 chunks (k 300 -> 320 slots, the last one padded with invalid slots; the ids ring of 4
  wraps) and two head blocks (H 80 -> 128), d_v 64 (one value tile per compute warpgroup);
  ids < 0 and >= S, duplicates, a fully masked row."""
  _check_fwd_bwd(b=1, t=2, h=80, k_dim=128, d_v=64, s=200, k=300, seed=3)


def test_pallas_interpret_fwd_bwd_scan_steps():
  """The custom VJP's backward in scan steps of one token per batch row (bwd_block_t 2, B 2,
  T 3: dkv summed over three steps), the same checks against the reference."""
  _check_fwd_bwd(
    b=2, t=3, h=48, k_dim=192, d_v=80, s=40, k=72, seed=7, config=GpuConfig(bwd_block_t=2)
  )


@pytest.mark.slow
@hypothesis.settings(max_examples=3, deadline=None)
@hypothesis.given(
  b=st.integers(1, 2),
  t=st.integers(1, 3),
  h=st.sampled_from([16, 64, 80]),
  k_dim=st.sampled_from([64, 128, 192]),
  s=st.integers(1, 70),
  k=st.integers(1, 80),
  seed=st.integers(0, 100),
)
def test_pallas_interpret_random_shapes(b, t, h, k_dim, s, k, seed):
  _check_fwd_bwd(b, t, h, k_dim, k_dim // 2, s, k, seed=seed, grads=False)


@hypothesis.settings(max_examples=3, deadline=None)
@hypothesis.given(
  t=st.integers(1, 4), s=st.integers(1, 30), k=st.integers(1, 40), seed=st.integers(0, 100)
)
def test_pallas_bwd_random_shapes(t, s, k, seed):
  """The backward (from the saved lse; the segment sum in the Triton interpreter) vs autodiff of
  the reference, via the reference fwd."""
  q, kv, idx = _inputs(1, t, 4, 16, s, k, jnp.float32, seed=seed)
  out, lse = reference.sparse_mla_reference(q, kv, idx, scale=SCALE, d_v=8)
  do = _testing.normal(seed + 3, out.shape)
  dl = jnp.where(jnp.isfinite(lse), _testing.normal(seed + 4, lse.shape), 0.0)
  dq, dkv = ops._bwd_blocked(
    q, kv, idx, out, lse, do, dl, scale=SCALE, d_v=8, block_t=2, interpret=True
  )
  _, rvjp = jax.vjp(
    lambda q, kv: reference.sparse_mla_reference(q, kv, idx, scale=SCALE, d_v=8), q, kv
  )
  rq, rkv = rvjp((do, dl))
  np.testing.assert_allclose(dq, rq, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(dkv, rkv, atol=1e-4, rtol=1e-4)


def test_bwd_blocked_bf16_rows():
  """bf16 inputs with the GPU path's bf16 dK rows (update_dtype) vs autodiff of the f32
  reference: B 2 (rows b*S + id), K 24 (columns padded to 64), T 5 in steps of 2 (a padded last
  step), duplicates, ids < 0 and >= S."""
  b, t, h, k_dim, d_v, s, k = 2, 5, 4, 24, 8, 9, 12
  q, kv, idx = _inputs(b, t, h, k_dim, s, k, jnp.bfloat16, seed=3)
  idx = idx.at[:, :, 0].set(idx[:, :, 1]).at[:, 1, 2].set(-1).at[:, 2, 3].set(s + 4)
  f32 = lambda x: x.astype(jnp.float32)
  (out, lse), rvjp = jax.vjp(
    lambda q, kv: reference.sparse_mla_reference(q, kv, idx, scale=SCALE, d_v=d_v),
    f32(q),
    f32(kv),
  )
  do = _testing.normal(5, out.shape).astype(jnp.bfloat16)
  dl = jnp.where(jnp.isfinite(lse), _testing.normal(6, lse.shape), 0.0)
  rq, rkv = rvjp((f32(do), dl))
  dq, dkv = ops._bwd_blocked(
    q,
    kv,
    idx,
    out.astype(jnp.bfloat16),
    lse,
    do,
    dl,
    scale=SCALE,
    d_v=d_v,
    block_t=2,
    update_dtype=jnp.bfloat16,
    interpret=True,
  )
  assert dq.dtype == dkv.dtype == jnp.bfloat16 and dkv.shape == kv.shape
  tol = 2 * _testing.tolerances(jnp.bfloat16)
  assert _testing.rel_err(dq, rq) < tol, _testing.rel_err(dq, rq)
  assert _testing.rel_err(dkv, rkv) < tol, _testing.rel_err(dkv, rkv)


def _export(fn, *args):
  return jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)


@pytest.mark.parametrize("batch", [1, 2])
def test_cross_lowering_cuda_full_shape(batch, triton_verified):
  """The real Mosaic GPU lowering (layouts, SMEM budget: three 72 KiB tiles + the P1 tile and
  the ids ring, tiled-TMA rules, the inline cp.async copies) at V3.2 shapes, forward and
  forward + backward (with the segment sum's Triton module, which passes the MLIR verifier)."""
  t, s, h, k_dim, d_v, k = 4096 // batch, 32768 // batch, 128, 576, 512, 2048
  sds = jax.ShapeDtypeStruct
  q, kv = sds((batch, t, h, k_dim), jnp.bfloat16), sds((batch, s, k_dim), jnp.bfloat16)
  idx = sds((batch, t, k), jnp.int32)
  fwd = functools.partial(ops.sparse_mla, scale=SCALE, d_v=d_v, impl="pallas")
  exp = _export(fwd, q, kv, idx)
  mlir = exp.mlir_module()
  assert "mosaic_gpu" in mlir and "cp.async.cg.shared.global" in mlir

  def fwd_bwd(q, kv, idx, do):
    (_, _), vjp = jax.vjp(lambda q, kv: fwd(q, kv, idx), q, kv)
    return vjp((do, jnp.zeros((batch, t, h), jnp.float32)))

  exp = _testing.export_cuda(fwd_bwd, q, kv, idx, sds((batch, t, h, d_v), jnp.bfloat16))
  mlir = exp.mlir_module()
  assert "mosaic_gpu" in mlir and "segment_sum_rows" in mlir
  assert triton_verified == [True]


@pytest.mark.parametrize("h, cluster", [(128, True), (64, False)])
def test_cross_lowering_cuda_launches_head_blocks_as_a_cluster(h, cluster):
  """A token's head blocks run as one cluster where there are 2, 4 or 8 of them (V3.2's 128
  heads: 2), so they share its rows in L2; one head block gets a plain grid. The lowered
  kernel reads its head block from the cluster index only in the first case."""
  sds = jax.ShapeDtypeStruct
  q, kv = sds((1, 256, h, 576), jnp.bfloat16), sds((1, 4096, 576), jnp.bfloat16)
  fwd = functools.partial(ops.sparse_mla, scale=SCALE, d_v=512, impl="pallas")
  mlir = _export(fwd, q, kv, sds((1, 256, 2048), jnp.int32)).mlir_module()
  assert "mosaic_gpu" in mlir and ("gpu.cluster_block_id" in mlir) == cluster


@pytest.mark.parametrize("k", [4096, 2000])
def test_cross_lowering_cuda_long_topk(k):
  """The ids are staged per chunk, so there is no bound on k: V3.2 dims at k 4096 (64 chunks)
  and at a k that is not a multiple of 64 (2000 -> 2048 slots)."""
  t, s, h, k_dim, d_v = 256, 32768, 128, 576, 512
  sds = jax.ShapeDtypeStruct
  q, kv = sds((2, t, h, k_dim), jnp.bfloat16), sds((2, s, k_dim), jnp.bfloat16)
  idx = sds((2, t, k), jnp.int32)
  fwd = functools.partial(ops.sparse_mla, scale=SCALE, d_v=d_v, impl="pallas")
  assert "mosaic_gpu" in _export(fwd, q, kv, idx).mlir_module()


def test_smem_bytes_exact(monkeypatch):
  """smem_bytes is what Mosaic GPU asks for at V3.2 shapes (its own sum of the buffers, each
  rounded up to whole KiB, and the barriers), under the 227 KiB opt-in maximum, and the same at
  k 2048 and 4096."""
  sizes = _testing.record_smem_sizes(monkeypatch)
  if sizes is None:
    pytest.skip("this Mosaic GPU does not size SMEM in _smem_tree_size")
  sds = jax.ShapeDtypeStruct
  q, kv = sds((1, 8, 128, 576), jnp.bfloat16), sds((1, 4096, 576), jnp.bfloat16)
  fwd = functools.partial(ops.sparse_mla, scale=SCALE, d_v=512, impl="pallas")
  for k in (2048, 4096):
    _export(fwd, q, kv, sds((1, 8, k), jnp.int32))
  assert sizes == 2 * [kernel_mosaic_gpu.smem_bytes(576, 2)]
  assert sizes[0] <= kernel_mosaic_gpu._SMEM_BYTES


def _on_gpu():
  if jax.default_backend() != "gpu":
    pytest.skip("needs an NVIDIA GPU")


@pytest.mark.gpu
def test_pallas_gpu_full_shape():
  _on_gpu()
  q, kv, idx = _inputs(1, 512, 128, 576, 32768, 2048, jnp.bfloat16, lo=-100, hi_extra=0)
  ro, rl = ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=512)
  o, l = ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=512, impl="pallas")
  assert _testing.rel_err(o, ro) < _testing.tolerances(jnp.bfloat16)
  assert _testing.rel_err(l, rl) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize(
  "t,s,h,k_dim,d_v,k",
  [(512, 32768, 128, 576, 512, 2048), (7, 50, 20, 96, 80, 72), (64, 32768, 128, 576, 512, 4096)],
)
def test_pallas_gpu(t, s, h, k_dim, d_v, k):
  """The forward vs the fp32 reference: a fully masked row, duplicates, ids < 0 and >= S; V3.2
  dims at k 2048 and 4096, and awkward ones (H 20, k 72 > S, d_v 80, K 96)."""
  _on_gpu()
  q, kv, idx = _inputs(2, t, h, k_dim, s, k, jnp.bfloat16, lo=-100, hi_extra=3)
  idx = idx.at[0, 0].set(-1)  # fully invalid row
  idx = idx.at[1, -1, :5].set(1)  # duplicates
  with jax.default_matmul_precision("highest"):
    ro, rl = ops.sparse_mla(
      q.astype(jnp.float32), kv.astype(jnp.float32), idx, scale=SCALE, d_v=d_v
    )
  o, l = ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=d_v, impl="pallas")
  err = _testing.rel_err(o, ro)
  assert err < _testing.tolerances(jnp.bfloat16), err
  np.testing.assert_array_equal(np.isinf(l), np.isinf(rl))
  fin = np.isfinite(rl)
  np.testing.assert_allclose(np.asarray(l)[fin], np.asarray(rl)[fin], atol=2e-3, rtol=2e-3)
  assert (np.asarray(o[0, 0], np.float32) == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("bwd", ["xla", "kernel"])
@pytest.mark.parametrize(
  "t,s,h,k_dim,d_v,k",
  [(64, 4096, 128, 576, 512, 2048), (7, 50, 20, 96, 80, 72)],
)
def test_pallas_gpu_grads(t, s, h, k_dim, d_v, k, bwd):
  """jax.vjp of the Mosaic GPU forward with either backward (blocked XLA, or the Mosaic GPU
  kernel; both sum dkv with the segment sum) with both cotangents vs autodiff of the fp32
  reference, at V3.2 dims and at awkward ones (H 20, k 72 > S, d_v 80, K 96); a fully masked
  row, duplicates, ids < 0 and >= S."""
  _on_gpu()
  q, kv, idx = _inputs(2, t, h, k_dim, s, k, jnp.bfloat16, lo=-100, hi_extra=3)
  idx = idx.at[0, 0].set(-1)  # fully invalid row
  idx = idx.at[1, -1, :5].set(1)  # duplicates
  config = GpuConfig(bwd=bwd)
  f = lambda q, kv: ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=d_v, impl="pallas", config=config)
  (o, l), vjp = jax.vjp(f, q, kv)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    rf = lambda q, kv: ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=d_v)
    (ro, rl), rvjp = jax.vjp(rf, f32(q), f32(kv))
    do = _testing.normal(5, o.shape, jnp.bfloat16)
    dl = jnp.where(jnp.isfinite(rl), _testing.normal(6, l.shape), 0.0)
    rgrads = rvjp((f32(do), dl))
  tol = _testing.tolerances(jnp.bfloat16)
  assert _testing.rel_err(o, ro) < tol
  for g, rg in zip(vjp((do, dl)), rgrads):
    assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()
    assert _testing.rel_err(g, rg) < 2 * tol, _testing.rel_err(g, rg)
