# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Top-k: reference vs a naive formula; the select kernels (interpret mode) and the bucketed
blocked indexer top-k vs the reference; Triton lowering at T1's shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.topk import kernel_triton, ops, reference


def _naive_topk(x, k):
  """Descending total order (+0.0 above -0.0), lower index first on ties; -inf slots -> -1."""
  out = np.full(x.shape[:-1] + (k,), -1, np.int32)
  for r in np.ndindex(x.shape[:-1]):
    row = x[r]
    order = np.lexsort((np.arange(row.size), np.signbit(row), -row))[:k]
    order = [i for i in order if row[i] > -np.inf]
    out[r][: len(order)] = order
  return out


def _sets(idx):
  return [
    sorted(int(i) for i in row if i >= 0) for row in np.asarray(idx).reshape(-1, idx.shape[-1])
  ]


def _scores(seed, shape, kind):
  rng = np.random.default_rng(seed)
  if kind == "normal":
    x = rng.standard_normal(shape).astype(np.float32)
  else:  # integer-valued: many exact ties
    x = rng.integers(-4, 5, size=shape).astype(np.float32)
  x[..., 0, 7:] = -np.inf  # a row with fewer valid keys than k
  x[..., 1, :] = -np.inf  # a fully masked row
  x[..., 2, ::3] = -0.0  # signed zeros: -0.0 ranks below +0.0 (lax.top_k's total order)
  x[..., 3, :] = np.where(np.arange(shape[-1]) % 3 == 0, 0.0, -0.0)  # k cuts through the zeros
  return x


def test_reference_matches_naive():
  x = _scores(0, (2, 5, 40), "ints")
  np.testing.assert_array_equal(
    np.asarray(reference.topk_reference(jnp.asarray(x), 12)), _naive_topk(x, 12)
  )


@pytest.mark.parametrize(
  "kind,shape,k,chunk,radix",
  [
    ("ints", (6, 300), 64, 64, 4),
    ("normal", (2, 4, 200), 33, 32, 2),
    ("ints", (5, 40), 64, 16, 8),  # k > S: every valid key, then -1
  ],
)
def test_pallas_select_matches_reference(kind, shape, k, chunk, radix):
  x = jnp.asarray(_scores(1, shape, kind))
  bs = kernel_triton.BlockSizes(chunk=chunk, radix_bits=radix)
  got = ops.topk(x, k, impl="pallas", interpret=True, block_sizes=bs)
  want = ops.topk(x, k, impl="reference")
  assert got.shape == want.shape and got.dtype == jnp.int32
  assert _sets(got) == _sets(want)
  # slots are ascending key indices, -1 padding last
  for row in np.asarray(got).reshape(-1, k):
    valid = row[row >= 0]
    assert np.all(np.diff(valid) > 0) and np.all(row[len(valid) :] == -1)


def _check_lengths(x, lengths, k, bs):
  got = kernel_triton.select_topk(x, lengths, k=k, block_sizes=bs, interpret=True)
  masked = jnp.where(jnp.arange(x.shape[1])[None] < lengths[:, None], x, -jnp.inf)
  assert _sets(got) == _sets(reference.topk_reference(masked, k))
  for row in np.asarray(got):
    valid = row[row >= 0]
    assert np.all(np.diff(valid) > 0) and np.all(row[len(valid) :] == -1)


def test_pallas_select_row_lengths():
  x = jnp.asarray(_scores(2, (4, 128), "ints"))
  lengths = jnp.array([128, 50, 3, 100], jnp.int32)
  _check_lengths(x, lengths, 20, kernel_triton.BlockSizes(chunk=32))


# cap=4 forces the key-space splitting passes and, on heavy ties, the no-scratch path (a bracket
# of one key value holding more than cap keys).
@pytest.mark.parametrize(
  "bs",
  [
    kernel_triton.BlockSizes(chunk=64, sample=32),
    kernel_triton.BlockSizes(chunk=32, sample=16, thresholds=4, cap=4, radix_bits=1),
    kernel_triton.BlockSizes(
      chunk=128, sample=64, thresholds=16, radix_bits=8, cap=40, prefetch=False
    ),
  ],
  ids=["sample", "sample-split", "sample-m16"],
)
def test_select_paths(bs):
  """Random floats and many-tie rows, lengths 0, <= k, k + 1 and full, masked and signed zeros."""
  x = np.concatenate([_scores(3, (6, 300), "normal"), _scores(4, (6, 300), "ints")])
  x[4, 150:] = -np.inf  # more masked keys than the length leaves room for
  lengths = jnp.array([300, 300, 300, 290, 300, 0, 300, 25, 300, 1, 26, 170], jnp.int32)
  _check_lengths(jnp.asarray(x), lengths, 25, bs)


def test_indexer_topk_blocked_buckets(monkeypatch):
  """Bucketed blocked indexer: one logits shape per key-width bucket (+ the partial last block),
  and the same sets as a dense causal select. Integer inputs make every logit exact (and tied
  often), and a jnp stand-in for the FP8 logits kernel keeps the test fast."""
  from pallas_kernels.lightning_indexer import kernel_mosaic_gpu as lik  # noqa: PLC0415

  shapes = set()

  def logits(q8, k8, wq, ks, *, block_sizes, causal=True, q_offset=None, interpret=None):
    del block_sizes, interpret
    shapes.add((q8.shape, k8.shape, causal))
    z = jnp.einsum("btjd,bsd->btjs", q8.astype(jnp.float32), k8.astype(jnp.float32))
    out = jnp.einsum("btj,btjs->bts", wq, jnp.maximum(z, 0.0)) * ks[:, None, :]
    if causal:
      pos = q_offset + jnp.arange(q8.shape[1])
      out = jnp.where(jnp.arange(k8.shape[1])[None, None] <= pos[None, :, None], out, -jnp.inf)
    return out

  monkeypatch.setattr(lik, "logits_fp8", logits)
  rng = np.random.default_rng(5)
  b, t, s, j, d, topk = 2, 120, 128, 4, 16, 24
  q = jnp.asarray(rng.integers(-3, 4, (b, t, j, d)), jnp.float32)
  k = jnp.asarray(rng.integers(-3, 4, (b, s, d)), jnp.float32)
  w = jnp.asarray(rng.integers(-2, 3, (b, t, j)), jnp.float32)
  lbs = lik.BlockSizes(block_q=8, block_k=64)
  sbs = kernel_triton.BlockSizes(chunk=32, sample=16)
  assert kernel_triton.bucket_widths(s, lbs.block_k, sbs.chunk, 2) == [64, 128]
  try:
    got = kernel_triton.indexer_topk_blocked(
      q,
      k,
      w,
      topk=topk,
      block_t=16,
      logits_block_sizes=lbs,
      select_block_sizes=sbs,
      num_buckets=2,
      interpret=True,
    )
  finally:
    kernel_triton.indexer_topk_blocked.clear_cache()  # the jit cache holds the stand-in
  # 7 full blocks (keys needed: 24, 40, .. 120 -> widths 64, 64, 64, 128, ..) and an 8-row tail
  assert {sh[:2] for sh in shapes} == {
    ((b, 16, j, d), (b, 64, d)),
    ((b, 16, j, d), (b, 128, d)),
    ((b, 8, j, d), (b, 128, d)),
  }
  assert not any(sh[2] for sh in shapes)
  dense = logits(*lik.prepare_fp8(q, k, w), block_sizes=None, causal=True, q_offset=s - t)
  assert got.shape == (b, t, topk)
  assert _sets(got) == _sets(reference.topk_reference(dense, topk))


def test_validation():
  with pytest.raises(ValueError, match="k=0"):
    ops.topk(jnp.ones((2, 8)), 0, impl="pallas")
  with pytest.raises(ValueError, match="impl"):
    ops.topk(jnp.ones((2, 8)), 2, impl="cuda")
  with pytest.raises(ValueError, match="floating"):
    ops.topk(jnp.ones((2, 8), jnp.int32), 2, impl="pallas")
  with pytest.raises(ValueError, match="power of 2"):
    kernel_triton.BlockSizes(chunk=48)
  with pytest.raises(ValueError, match="radix_bits"):
    kernel_triton.BlockSizes(radix_bits=3)
  with pytest.raises(ValueError, match="thresholds"):
    kernel_triton.BlockSizes(thresholds=2)
  with pytest.raises(ValueError, match="sample"):
    kernel_triton.BlockSizes(sample=8)


def test_export_cuda_t1_shape():
  """Pallas-Triton lowering of the select kernel at T1's shape (32768 rows x 32768, k=2048)."""
  bs = kernel_triton.BlockSizes.default_for(32768)
  f = jax.jit(lambda x: ops.topk(x, 2048, impl="pallas", block_sizes=bs))
  mesh = jax.sharding.AbstractMesh(
    (),
    (),
    abstract_device=jax.sharding.AbstractDevice(
      device_kind="NVIDIA H200", platform="gpu", num_cores=132
    ),
  )
  with jax.sharding.use_abstract_mesh(mesh):
    exp = export.export(
      f,
      platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)],
    )(jax.ShapeDtypeStruct((32768, 32768), jnp.float32))
  assert exp.out_avals[0].shape == (32768, 2048)


@pytest.mark.gpu
def test_gpu_select_matches_reference():
  x = jax.random.normal(jax.random.key(0), (512, 32768), jnp.float32)
  x = jnp.round(x * 8) / 8  # ties
  got = ops.topk(x, 2048, impl="pallas")
  assert _sets(got) == _sets(ops.topk(x, 2048, impl="reference"))
