# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""DeepSeek-V4's indexer over compressed keys on the V3.2 GPU kernels
(pallas_kernels/v4_attention/ops.py: compressed_topk, compressed_indexer_logits, impl="pallas").

- the FP8 logits kernel's block-causal bound (ratio m) in the GPU interpreter vs the reference,
  both layouts, a ratio larger than block_q (CTAs with no visible key);
- the fused top-k (FP8 logits + select with per-row lengths (t+1)//m) in the interpreters vs
  reference.compressed_indexer_topk: the same index sets (slots in ascending entry order, the V3.2
  pallas convention), for T < m, T not a multiple of m, topk >= the visible entries, exact ties;
- the fallbacks (shapes the kernel does not take) and errors;
- jax.export CUDA lowering at V4-Flash shapes (T 8192, U 2048, J 64, D 128, k 512).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._testing import export_cuda
from pallas_kernels.lightning_indexer import kernel_mosaic_gpu as lik
from pallas_kernels.v4_attention import ops, reference


def _inputs(seed, b, t, u, j=64, d=128):
  """FP8 fake-quantised q, k (what the model feeds; the kernel's re-quantisation is then exact)."""
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, j, d))
  k = jax.random.normal(ks[1], (b, u, d))
  w = jax.random.normal(ks[2], (b, t, j)) / np.sqrt(j * d)
  if d == lik.DIM:
    q8, qs = lik.quantize_e4m3(q)
    k8, kss = lik.quantize_e4m3(k)
    q, k = q8.astype(jnp.float32) * qs[..., None], k8.astype(jnp.float32) * kss[..., None]
  return q, k, w


def _sets(idx):
  return [
    sorted(int(i) for i in row if i >= 0) for row in np.asarray(idx).reshape(-1, idx.shape[-1])
  ]


@pytest.mark.parametrize(
  "ratio,t,bs",
  [
    (4, 32, lik.BlockSizes.default_for(32, 128)),  # keys_m, the product layout
    (4, 24, lik.BlockSizes(block_q=8, block_k=64)),  # heads_m
    # ratio > block_q: the first CTAs see no key (one block is scored and masked)
    (16, 40, lik.BlockSizes(block_q=8, block_k=64)),
  ],
  ids=["keys_m_m4", "heads_m_m4", "heads_m_m16"],
)
def test_logits_kernel_block_causal(ratio, t, bs):
  from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

  u = -(-t // ratio)  # one more entry than any query sees when t % ratio
  q, k, w = _inputs(0, 1, t, u)
  s = -(-u // bs.block_k) * bs.block_k
  kp = jnp.pad(k, ((0, 0), (0, s - u), (0, 0)))
  got = lik.logits_fp8(
    *lik.prepare_fp8(q, kp, w),
    block_sizes=bs,
    ratio=ratio,
    interpret=plgpu.InterpretGPUParams(),
  )[:, :, :u]
  want = reference.compressed_indexer_logits(q, k, w, ratio)
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  fin = np.isfinite(want)
  np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5)


def test_logits_op_ragged():
  """compressed_indexer_logits(impl="pallas"): T, U padded inside, T % m != 0."""
  q, k, w = _inputs(1, 2, 22, 5)
  got = np.asarray(ops.compressed_indexer_logits(q, k, w, 4, impl="pallas", interpret=True))
  want = np.asarray(ops.compressed_indexer_logits(q, k, w, 4))
  assert got.shape == want.shape == (2, 22, 5)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  fin = np.isfinite(want)
  np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "b,t,u,topk,block_t",
  [
    (2, 22, 5, 3, 16),  # T % m != 0, batch 2, a partial last query block, topk < visible
    (1, 40, 10, 16, 16),  # topk >= every row's visible entries: all of them, -1 padded
    (1, 6, 1, 2, 512),  # one entry, rows 0..2 see none
  ],
)
def test_topk_matches_reference_sets(b, t, u, topk, block_t):
  q, k, w = _inputs(2, b, t, u)
  got = ops.compressed_topk(
    q, k, w, ratio=4, topk=topk, block_t=block_t, impl="pallas", interpret=True
  )
  want = ops.compressed_topk(q, k, w, ratio=4, topk=topk, block_t=block_t)
  assert got.shape == want.shape == (b, t, topk) and got.dtype == jnp.int32
  assert _sets(got) == _sets(want)
  g = np.asarray(got)
  n_vis = np.minimum((np.arange(t) + 1) // 4, u)
  assert (np.sum(g >= 0, axis=-1) == np.minimum(topk, n_vis)[None]).all()
  for row in g.reshape(-1, topk):  # ascending ids, then -1
    n = int(np.sum(row >= 0))
    assert (np.diff(row[:n]) > 0).all() and (row[n:] == -1).all()


def test_topk_ties_go_to_the_lower_id():
  """Entries repeat 3 distinct keys: bit-equal scores, the k-th falls inside a tie group."""
  q, k, w = _inputs(3, 1, 48, 12)
  k = k[:, jnp.arange(12) % 3]
  got = ops.compressed_topk(q, k, w, ratio=4, topk=5, block_t=16, impl="pallas", interpret=True)
  want = ops.compressed_topk(q, k, w, ratio=4, topk=5, block_t=16)
  assert _sets(got) == _sets(want)


def test_t_below_ratio_and_fallbacks():
  q, k, w = _inputs(4, 1, 3, 0)
  got = ops.compressed_topk(q, k, w, ratio=4, topk=4, impl="pallas", interpret=True)
  assert (np.asarray(got) == -1).all() and got.shape == (1, 3, 4)
  # J, D the FP8 kernel does not take: the reference (the V4 test presets), unless the kernels
  # are asked for explicitly
  q, k, w = _inputs(5, 1, 12, 3, j=4, d=16)
  want = reference.compressed_indexer_topk(q, k, w, ratio=4, topk=2)
  np.testing.assert_array_equal(ops.compressed_topk(q, k, w, ratio=4, topk=2, impl="pallas"), want)
  with pytest.raises(ValueError, match="not taken"):
    ops.compressed_topk(q, k, w, ratio=4, topk=2, impl="pallas", interpret=True)
  with pytest.raises(ValueError, match="topk"):
    ops.compressed_topk(q, k, w, ratio=4, topk=0, impl="pallas")
  with pytest.raises(ValueError, match="impl"):
    ops.compressed_topk(q, k, w, ratio=4, topk=2, impl="triton")


@pytest.mark.parametrize(
  "b,t,u,topk,block_t,j",
  [
    (2, 22, 5, 3, 16, 64),  # T % m != 0, batch 2, a partial last query block, topk < visible
    (1, 40, 10, 16, 16, 8),  # topk >= every row's visible entries; J 8 (the TPU kernel's minimum)
    pytest.param(1, 6, 1, 2, 512, 8, marks=pytest.mark.slow),  # one entry; block_t > T
  ],
)
def test_topk_tpu_interpret_matches_reference(b, t, u, topk, block_t, j):
  """backend="tpu": the TPU logits kernel with the block-causal bound (TPU interpreter, FP8
  numerics: exact on FP8 fake-quantised inputs) and the TPU top-k give the reference's slots,
  in its order (descending score; ties to the lower id)."""
  q, k, w = _inputs(6, b, t, u, j=j)
  got = ops.compressed_topk(
    q, k, w, ratio=4, topk=topk, block_t=block_t, impl="pallas", interpret=True, backend="tpu"
  )
  want = ops.compressed_topk(q, k, w, ratio=4, topk=topk, block_t=block_t)
  assert got.shape == want.shape == (b, t, topk) and got.dtype == jnp.int32
  np.testing.assert_array_equal(got, want)


def test_topk_tpu_ratio_blocks():
  """The TPU kernel's dead-block skip and mask at ratio 16 > block_q: whole query blocks see no
  entry, later ones see a growing prefix; the logits equal the reference's visible scores."""
  from pallas_kernels.lightning_indexer import kernel_tpu  # noqa: PLC0415

  q, k, w = _inputs(7, 1, 64, 4, j=8)
  qx, kx, wq, ks = kernel_tpu.prepare(q, k, w, "fp8")
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 128 - 4)) + ((0, 0),) * (x.ndim - 2))
  got = kernel_tpu.logits_call(
    qx, pad(kx), wq, pad(ks), block_sizes=kernel_tpu.BlockSizes(8, 128), ratio=16, interpret=True
  )[..., :4]
  want = reference.compressed_indexer_logits(q, k, w, 16)
  vis = np.isfinite(np.asarray(want))
  np.testing.assert_array_equal(np.isfinite(np.asarray(got)), vis)
  np.testing.assert_allclose(np.asarray(got)[vis], np.asarray(want)[vis], rtol=1e-5, atol=1e-5)


def test_export_tpu_v4_flash_shapes():
  """compressed_topk(backend="tpu") lowers for TPU at V4-Flash shapes (T 8192, U = T/4, J 64,
  D 128, k 512, 512-query blocks)."""
  from jax import export  # noqa: PLC0415

  f32, t = jnp.float32, 8192
  f = lambda q, k, w: ops.compressed_topk(
    q, k, w, ratio=4, topk=512, block_t=512, impl="pallas", backend="tpu"
  )
  args = (
    jax.ShapeDtypeStruct((1, t, 64, 128), f32),
    jax.ShapeDtypeStruct((1, t // 4, 128), f32),
    jax.ShapeDtypeStruct((1, t, 64), f32),
  )
  exp = export.export(jax.jit(f), platforms=["tpu"])(*args)
  assert exp.out_avals[0].shape == (1, t, 512) and "indexer_logits_tpu" in exp.mlir_module()


@pytest.mark.parametrize("topk", [512, 1024], ids=["flash", "pro"])
def test_export_cuda_v4_flash_shapes(topk):
  """compressed_topk(impl="pallas") lowers for cuda at V4 shapes: T 8192, U = T/4, J 64, D 128,
  k 512 (Flash) or 1024 (Pro), the model's 512-query blocks; both kernels are in the module."""
  f32, t = jnp.float32, 8192
  exp = export_cuda(
    lambda q, k, w: ops.compressed_topk(q, k, w, ratio=4, topk=topk, block_t=512, impl="pallas"),
    jax.ShapeDtypeStruct((1, t, 64, 128), f32),
    jax.ShapeDtypeStruct((1, t // 4, 128), f32),
    jax.ShapeDtypeStruct((1, t, 64), f32),
  )
  assert exp.out_avals[0].shape == (1, t, topk)
  text = exp.mlir_module()
  assert "mosaic_gpu" in text and "sample_select_topk" in text


@pytest.mark.gpu
def test_gpu_compressed_logits_and_topk():
  """On the GPU at V4-Flash-like sizes (T 4096, m 4, U 1024, 64 heads x 128, k 512): the FP8
  logits against the f32 reference (Hopper's fp8 wgmma accumulates with ~14 mantissa bits, as in
  the V3.2 test), the fused top-k exactly equal to lax.top_k's sets over the kernel's own logits,
  and ~fully overlapping the reference's sets (only boundary keys may swap)."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs an NVIDIA GPU")
  t, m, u, topk = 4096, 4, 1024, 512
  q, k, w = _inputs(21, 1, t, u)
  got = ops.compressed_indexer_logits(q, k, w, ratio=m, impl="pallas")
  with jax.default_matmul_precision("highest"):
    want = ops.compressed_indexer_logits(q, k, w, ratio=m)
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  fin = np.isfinite(want)
  err = np.linalg.norm(got[fin] - want[fin]) / np.linalg.norm(want[fin])
  assert err < 5e-4, err
  gi = _sets(ops.compressed_topk(q, k, w, ratio=m, topk=topk, impl="pallas"))
  vals, own = jax.lax.top_k(jnp.asarray(got), topk)
  assert gi == _sets(jnp.where(jnp.isfinite(vals), own, -1))
  with jax.default_matmul_precision("highest"):
    wi = _sets(ops.compressed_topk(q, k, w, ratio=m, topk=topk))
  overlap = np.mean([len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(gi, wi) if b])
  assert overlap > 0.999, overlap
