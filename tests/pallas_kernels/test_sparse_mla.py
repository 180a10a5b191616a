# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sparse MLA: reference vs a naive dense masked softmax, the Mosaic GPU kernel (GPU interpreter)
vs the reference (forward and jax.vjp gradients), and cross-lowering for CUDA at the V3.2 shapes."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels.sparse_mla import kernel, kernel_triton, ops, reference

SCALE = 0.13


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


def test_block_sizes_validate():
  with pytest.raises(ValueError, match="block_k"):
    kernel.BlockSizes(block_k=32)
  with pytest.raises(ValueError, match="block_v"):
    kernel.BlockSizes(block_v=96)
  assert kernel.BlockSizes.default_for(512) == kernel.BlockSizes(64, 256)


def test_pallas_shape_errors():
  q, kv, idx = _inputs(1, 2, 64, 64, 16, 8, jnp.bfloat16)
  with pytest.raises(ValueError, match="bf16 or f16"):
    ops.sparse_mla(q.astype(jnp.float32), kv, idx, scale=SCALE, d_v=32, impl="pallas")
  with pytest.raises(ValueError, match="d_v"):
    ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=65, impl="pallas")
  with pytest.raises(ValueError, match="impl"):
    ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=32, impl="triton")


def _check_fwd_bwd(b, t, h, k_dim, d_v, s, k, seed=0, grads=True, variant="mosaic", **kw):
  q, kv, idx = _inputs(b, t, h, k_dim, s, k, jnp.bfloat16, seed=seed)
  idx = idx.at[0, 0].set(-1)  # fully invalid row
  idx = idx.at[-1, -1, : min(k, 5)].set(1)  # duplicates
  tol = _testing.tolerances(jnp.bfloat16)
  f = lambda impl: (
    lambda q, kv: ops.sparse_mla(
      q, kv, idx, scale=SCALE, d_v=d_v, impl=impl, interpret=True, variant=variant, **kw
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
    for g, rg in zip(vjp((do, dl)), rvjp((do, dl))):
      assert g.shape == rg.shape and g.dtype == rg.dtype
      assert _testing.rel_err(g, rg) < 2 * tol, _testing.rel_err(g, rg)


def test_pallas_interpret_fwd_bwd():
  # ragged k (72 -> padded to 128 with invalid slots), k > S, d_v not a multiple of 64, H < 64.
  _check_fwd_bwd(b=2, t=2, h=48, k_dim=96, d_v=80, s=40, k=72)


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
  """The backward (XLA, from the saved lse) vs autodiff of the reference, via the reference fwd."""
  q, kv, idx = _inputs(1, t, 4, 16, s, k, jnp.float32, seed=seed)
  out, lse = reference.sparse_mla_reference(q, kv, idx, scale=SCALE, d_v=8)
  do = _testing.normal(seed + 3, out.shape)
  dl = jnp.where(jnp.isfinite(lse), _testing.normal(seed + 4, lse.shape), 0.0)
  dq, dkv = ops._bwd_blocked(q, kv, idx, out, lse, do, dl, scale=SCALE, d_v=8, block_t=2)
  _, rvjp = jax.vjp(
    lambda q, kv: reference.sparse_mla_reference(q, kv, idx, scale=SCALE, d_v=8), q, kv
  )
  rq, rkv = rvjp((do, dl))
  np.testing.assert_allclose(dq, rq, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(dkv, rkv, atol=1e-4, rtol=1e-4)


def _export(fn, *args):
  return jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)


@pytest.mark.parametrize("batch", [1, 2])
def test_cross_lowering_cuda_full_shape(batch):
  """Runs the real Mosaic GPU lowering (layouts, SMEM budget, tiled-TMA rules) at V3.2 shapes."""
  t, s, h, k_dim, d_v, k = 4096 // batch, 32768 // batch, 128, 576, 512, 2048
  sds = jax.ShapeDtypeStruct
  q, kv = sds((batch, t, h, k_dim), jnp.bfloat16), sds((batch, s, k_dim), jnp.bfloat16)
  idx = sds((batch, t, k), jnp.int32)
  fwd = functools.partial(ops.sparse_mla, scale=SCALE, d_v=d_v, impl="pallas", variant="mosaic")
  exp = _export(fwd, q, kv, idx)
  assert "mosaic_gpu" in exp.mlir_module()

  def fwd_bwd(q, kv, idx, do):
    (_, _), vjp = jax.vjp(lambda q, kv: fwd(q, kv, idx), q, kv)
    return vjp((do, jnp.zeros((batch, t, h), jnp.float32)))

  exp = _export(fwd_bwd, q, kv, idx, sds((batch, t, h, d_v), jnp.bfloat16))
  assert "mosaic_gpu" in exp.mlir_module()


@pytest.mark.gpu
def test_pallas_gpu_full_shape():
  if jax.default_backend() != "gpu":
    pytest.skip("needs an NVIDIA GPU")
  q, kv, idx = _inputs(1, 512, 128, 576, 32768, 2048, jnp.bfloat16, lo=-100, hi_extra=0)
  o, l = ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=512, impl="pallas")
  ro, rl = ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=512)
  assert _testing.rel_err(o, ro) < _testing.tolerances(jnp.bfloat16)
  assert _testing.rel_err(l, rl) < 1e-4


# ---------------------------------------------------------------------------------------------
# Warp-specialised Mosaic GPU forward (variant "mosaic_ws"): copy warpgroups + two compute WGs.


@pytest.mark.parametrize(
  "ws",
  [
    kernel.WsBlockSizes(),  # direct copies
    kernel.WsBlockSizes(pairs=True),
    kernel.WsBlockSizes(direct=False),  # lane copies (Pallas copies in the interpreter)
    kernel.WsBlockSizes(direct=False, split_qk=True, idx_in_smem=False, lane_copies=False),
    pytest.param(
      kernel.WsBlockSizes(direct=False, copy_wgs=4, idx_in_smem=False, lane_copies=False),
      marks=pytest.mark.slow,
    ),
  ],
)
def test_ws_interpret_fwd_bwd(ws):  # lane copies fall back to Pallas copies in the interpreter
  # ragged k (72 -> 128 slots), k > S, d_v=80 (-> 128 output columns), H < 64, 2-tile split.
  _check_fwd_bwd(b=2, t=2, h=48, k_dim=192, d_v=80, s=40, k=72, variant="mosaic_ws", ws_config=ws)


def test_ws_layout_errors():
  q = jnp.zeros((2, 64, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="d_out=192"):
    kernel.sparse_mla_fwd_ws(
      q, q[0], jnp.zeros((2, 64), jnp.int32), scale=1.0, d_out=192, bs=kernel.WsBlockSizes()
    )
  with pytest.raises(ValueError, match="copy_wgs=3"):
    kernel.WsBlockSizes(copy_wgs=3)
  with pytest.raises(ValueError, match="split_qk needs idx_in_smem=False"):
    kernel.WsBlockSizes(direct=False, split_qk=True)
  with pytest.raises(ValueError, match="lane_copies=True needs idx_in_smem=True"):
    kernel.WsBlockSizes(direct=False, idx_in_smem=False)
  with pytest.raises(ValueError, match="direct=True needs idx_in_smem=True"):
    kernel.WsBlockSizes(idx_in_smem=False, lane_copies=False)
  with pytest.raises(ValueError, match="pairs=True needs direct=True"):
    kernel.WsBlockSizes(direct=False, pairs=True)
  with pytest.raises(ValueError, match="pairs needs an even number"):  # Kp = d_out: no rope tile
    kernel.sparse_mla_fwd_ws(
      q,
      q[0],
      jnp.zeros((2, 128), jnp.int32),
      scale=1.0,
      d_out=128,
      bs=kernel.WsBlockSizes(pairs=True),
      interpret=True,
    )
  with pytest.raises(ValueError, match="copy_wgs=2"):
    kernel.sparse_mla_fwd_ws(
      q,
      q[0],
      jnp.zeros((2, 64), jnp.int32),
      scale=1.0,
      d_out=128,
      bs=kernel.WsBlockSizes(copy_wgs=2),
    )


@pytest.mark.parametrize(
  "ws",
  [
    kernel.WsBlockSizes(),
    kernel.WsBlockSizes(pairs=True),
    kernel.WsBlockSizes(direct=False),
    kernel.WsBlockSizes(direct=False, copy_wgs=4, lane_copies=False),
    kernel.WsBlockSizes(direct=False, split_qk=True, idx_in_smem=False, lane_copies=False),
  ],
)
def test_ws_cross_lowering_cuda_full_shape(ws):
  """SMEM budget (227 KiB: three 72 KiB tiles + the idx row), TMA box and layout rules at V3.2."""
  t, s, h, k_dim, d_v, k = 2048, 32768, 128, 576, 512, 2048
  sds = jax.ShapeDtypeStruct
  q, kv = sds((2, t, h, k_dim), jnp.bfloat16), sds((2, s, k_dim), jnp.bfloat16)
  idx = sds((2, t, k), jnp.int32)
  fwd = functools.partial(
    ops.sparse_mla, scale=SCALE, d_v=d_v, impl="pallas", variant="mosaic_ws", ws_config=ws
  )
  assert "mosaic_gpu" in _export(fwd, q, kv, idx).mlir_module()


@pytest.mark.gpu
@pytest.mark.parametrize(
  "t,s,h,k_dim,d_v,k", [(512, 32768, 128, 576, 512, 2048), (7, 50, 20, 96, 80, 72)]
)
def test_ws_gpu(t, s, h, k_dim, d_v, k):
  if jax.default_backend() != "gpu":
    pytest.skip("needs an NVIDIA GPU")
  q, kv, idx = _inputs(2, t, h, k_dim, s, k, jnp.bfloat16, lo=-100, hi_extra=3)
  idx = idx.at[0, 0].set(-1)  # fully invalid row
  idx = idx.at[1, -1, :5].set(1)  # duplicates
  for ws in (
    kernel.WsBlockSizes(),  # direct copies
    kernel.WsBlockSizes(pairs=True),  # (falls back to pairs=False at k_dim 96: no rope tile)
    kernel.WsBlockSizes(no_auto_barriers=True),
    kernel.WsBlockSizes(direct=False),  # lane copies
    kernel.WsBlockSizes(direct=False, copy_wgs=2, no_auto_barriers=True),
    kernel.WsBlockSizes(direct=False, copy_wgs=2, lane_copies=False, idx_in_smem=False),
    kernel.WsBlockSizes(direct=False, split_qk=True, idx_in_smem=False, lane_copies=False),
  ):
    o, l = ops.sparse_mla(
      q, kv, idx, scale=SCALE, d_v=d_v, impl="pallas", variant="mosaic_ws", ws_config=ws
    )
    with jax.default_matmul_precision("highest"):
      ro, rl = ops.sparse_mla(
        q.astype(jnp.float32), kv.astype(jnp.float32), idx, scale=SCALE, d_v=d_v
      )
    assert _testing.rel_err(o, ro) < _testing.tolerances(jnp.bfloat16), (
      ws,
      _testing.rel_err(o, ro),
    )
    np.testing.assert_array_equal(np.isinf(l), np.isinf(rl))
    fin = np.isfinite(rl)
    np.testing.assert_allclose(np.asarray(l)[fin], np.asarray(rl)[fin], atol=2e-3, rtol=2e-3)
    assert (np.asarray(o[0, 0], np.float32) == 0).all()


# ---------------------------------------------------------------------------------------------
# Triton-backend kernels (kernel_triton.py): variants "triton_xla_bwd",
# "triton" (Triton backward kernel with dkv atomics) and the other ops.TRITON_VARIANTS backwards.


def test_triton_split_dims():
  assert kernel_triton.split_dims(576, 512) == (512, 64)
  assert kernel_triton.split_dims(96, 80) == (128, 0)
  assert kernel_triton.split_dims(96, 32) == (32, 64)
  with pytest.raises(ValueError, match="block_k"):
    kernel_triton.BlockSizes(block_k=48)
  with pytest.raises(ValueError, match="variant"):
    q, kv, idx = _inputs(1, 2, 64, 64, 16, 8, jnp.bfloat16)
    ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=32, impl="pallas", variant="cuda")
  with pytest.raises(ValueError, match="bwd"):
    ops.TritonConfig(bwd="cuda")
  with pytest.raises(ValueError, match="value_split"):
    kernel_triton.BlockSizes(value_split=3)


@pytest.mark.parametrize(
  "variant",
  [
    "triton_xla_bwd",
    "triton_hybrid_bwd",  # Triton dq + dS/P, Triton dkv (all heads per atomic)
    "triton_hybrid_xla_bwd",  # Triton dq + dS/P, XLA dkv
    "triton_xla_fused_bwd",
    pytest.param("triton", marks=pytest.mark.slow),
  ],
)
def test_triton_interpret_fwd_bwd(variant):
  # ragged k (72 -> padded with invalid slots), k > S, duplicates, H < 64, d_v not a power of 2.
  _check_fwd_bwd(b=2, t=2, h=48, k_dim=96, d_v=80, s=40, k=72, variant=variant)


@pytest.mark.parametrize(
  "variant", ["triton_hybrid_bwd", pytest.param("triton", marks=pytest.mark.slow)]
)
def test_triton_interpret_rope_split(variant):
  # db > 0 (da = 32 value dims + 64 more logit dims), as V3.2's 512 + 64 split: the hybrid's dkv
  # kernel runs its second (rope, dS only) pass.
  _check_fwd_bwd(b=1, t=2, h=16, k_dim=96, d_v=32, s=30, k=40, variant=variant)


def test_triton_interpret_tuning_knobs():
  """Forward knobs (128 heads a program, split accumulator, prefetched slot ids, sorted slots)
  and the XLA backward's bf16 dkv-row updates with one-token scan steps."""
  cfg = ops.TritonConfig(
    fwd=kernel_triton.BlockSizes(block_h=128, block_k=32, value_split=2, prefetch_idx=True),
    sort_idx=True,
    xla_block_t=1,
    xla_bf16_updates=True,
  )
  _check_fwd_bwd(b=2, t=2, h=48, k_dim=96, d_v=80, s=40, k=72, variant=None, triton_config=cfg)


@pytest.mark.slow
def test_triton_bwd_kernel_duplicates_exact():
  """All slots of a token hit 3 rows (heavy duplicates): dkv must add every contribution."""
  q, kv, _ = _inputs(1, 3, 16, 64, 8, 8, jnp.float32)
  q, kv = q.astype(jnp.bfloat16), kv.astype(jnp.bfloat16)
  idx = jnp.array([[[0, 1, 2, 0, 1, 2, 0, -1]] * 3], jnp.int32)
  f = lambda impl: (
    lambda q, kv: ops.sparse_mla(
      q, kv, idx, scale=SCALE, d_v=32, impl=impl, interpret=True, variant="triton"
    )[0]
  )
  o, vjp = jax.vjp(f("pallas"), q, kv)
  _, rvjp = jax.vjp(f("reference"), q, kv)
  do = _testing.normal(3, o.shape, jnp.bfloat16)
  (dq, dkv), (rq, rkv) = vjp(do), rvjp(do)
  assert _testing.rel_err(dq, rq) < 2 * _testing.tolerances(jnp.bfloat16)
  assert _testing.rel_err(dkv, rkv) < 2 * _testing.tolerances(jnp.bfloat16)
  assert (np.asarray(dkv[0, 3:], np.float32) == 0).all()  # never selected rows get nothing


_KNOBS = ops.TritonConfig(
  fwd=kernel_triton.BlockSizes(block_k=32, num_stages=3, value_split=2, prefetch_idx=True),
  bwd="hybrid",
  bwd_bs=kernel_triton.BwdBlockSizes(block_k=32, num_stages=2, col_block=256),
  dkv_bs=kernel_triton.DkvBlockSizes(col_block=256, num_stages=1),
)


@pytest.mark.parametrize("variant", [*ops.TRITON_VARIANTS, "knobs"])
def test_triton_cross_lowering_cuda_full_shape(variant):
  """Pallas-Triton lowering of the fwd (+ bwd) at V3.2 shapes (ptxas/SMEM are not checked)."""
  from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415

  t, s, h, k_dim, d_v, k = 4096, 32768, 128, 576, 512, 2048
  sds = jax.ShapeDtypeStruct
  q, kv = sds((1, t, h, k_dim), jnp.bfloat16), sds((1, s, k_dim), jnp.bfloat16)
  idx = sds((1, t, k), jnp.int32)
  cfg = _KNOBS if variant == "knobs" else ops.TRITON_VARIANTS[variant]
  fwd = functools.partial(ops.sparse_mla, scale=SCALE, d_v=d_v, impl="pallas", triton_config=cfg)

  def fwd_bwd(q, kv, idx, do):
    (_, _), vjp = jax.vjp(lambda q, kv: fwd(q, kv, idx), q, kv)
    return vjp((do, jnp.zeros((1, t, h), jnp.float32)))

  dev = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=8
  )
  checks = [jax.export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)]
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=dev)):
    exp = jax.export.export(jax.jit(fwd_bwd), platforms=["cuda"], disabled_checks=checks)(
      q, kv, idx, sds((1, t, h, d_v), jnp.bfloat16)
    )
  mod = exp.mlir_module()
  assert "sparse_mla_fwd_triton" in mod
  assert ("sparse_mla_bwd_triton" in mod) == (cfg.bwd == "triton")
  assert ("sparse_mla_bwd_dq_triton" in mod) == cfg.bwd.startswith("hybrid")
  assert ("sparse_mla_dkv_triton" in mod) == (cfg.bwd == "hybrid")
  relaxed = cfg.bwd == "hybrid" or (cfg.bwd == "triton" and cfg.bwd_bs.relaxed_atomics)
  assert ("atomic_add_relaxed" in mod) == relaxed  # the primitive's name in the kernel's locations
