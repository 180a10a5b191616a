# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Indexer TPU (Mosaic) logits kernel under the TPU interpreter (fp8 / int8 / bf16 numerics) vs its
XLA emulation and the reference; the indexer top-k on the TPU path; TPU cross-lowering at the V3.2
indexer shape (L=32768, J=64, D=128) for every numerics choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _testing
from pallas_kernels.lightning_indexer import kernel_tpu, ops, reference

INTERPRET = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")
# rel. error of the logits vs the f32 reference, per numerics (random normal inputs, D=128)
_TOL = {"fp8": 6e-2, "int8": 2e-2, "bf16": 1e-2}


def _inputs(b, t, s, j=64, d=128, seed=0):
  q = _testing.normal(seed, (b, t, j, d))
  k = _testing.normal(seed + 1, (b, s, d))
  w = _testing.normal(seed + 2, (b, t, j), scale=0.1)
  return q, k, w


@pytest.mark.parametrize("numerics", kernel_tpu.NUMERICS)
def test_logits_interpret(numerics):
  # T=16 of S=256 keys: 2 query blocks x 2 key blocks; J=16 heads keeps the interpreter quick.
  q, k, w = _inputs(1, 16, 256, j=16)
  out = ops.indexer_logits(
    q,
    k,
    w,
    impl="pallas",
    backend="tpu",
    numerics=numerics,
    interpret=INTERPRET,
    block_sizes=kernel_tpu.BlockSizes(block_q=8, block_k=128),
  )
  ref = reference.indexer_logits_reference(q, k, w)
  emu = kernel_tpu.emulate_logits(q, k, w, numerics)
  fin = np.isfinite(np.asarray(ref))
  np.testing.assert_array_equal(np.isfinite(np.asarray(out)), fin)
  np.testing.assert_allclose(np.where(fin, out, 0), np.where(fin, emu, 0), rtol=1e-5, atol=1e-5)
  assert _testing.rel_err(np.where(fin, out, 0), np.where(fin, ref, 0)) < _TOL[numerics]


def test_dead_key_blocks_and_offsets():
  # 8 queries at positions 0..7 (q_offset=0) of S=384 keys: key blocks 1 and 2 are dead (-inf,
  # not computed, not fetched); non-causal computes everything.
  q, k, w = _inputs(1, 8, 384, j=8)
  bs = kernel_tpu.BlockSizes(block_q=8, block_k=128)
  full = np.asarray(kernel_tpu.emulate_logits(q, k, w, "bf16", causal=False))
  causal = np.where(np.arange(384)[None, None, :] <= np.arange(8)[None, :, None], full, -np.inf)
  for c, want in ((False, full), (True, causal)):
    out = kernel_tpu.indexer_logits_tpu(
      q, k, w, numerics="bf16", block_sizes=bs, causal=c, q_offset=0, interpret=INTERPRET
    )
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_indexer_topk_tpu_exact_and_approx():
  q, k, w = _inputs(1, 8, 256, j=8, seed=4)
  ref = reference.indexer_topk_reference(q, k, w, topk=64)
  logits = np.asarray(kernel_tpu.emulate_logits(q, k, w, "bf16"))
  for rt in (None, 0.9):
    idx = ops.indexer_topk(
      q, k, w, topk=64, impl="pallas", backend="tpu", numerics="bf16", recall_target=rt,
      interpret=INTERPRET,
    )  # fmt: skip
    assert idx.shape == ref.shape and idx.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(idx) < 0, np.asarray(ref) < 0)
    # the selected keys are a top-64 of the bf16 logits (ties aside)
    for r in range(8):
      sel = [i for i in np.asarray(idx[0, r]) if i >= 0]
      kth = np.sort(logits[0, r][np.isfinite(logits[0, r])])[::-1][len(sel) - 1]
      assert (logits[0, r][sel] >= kth - 1e-6).all()


def test_default_numerics_and_errors():
  assert kernel_tpu.default_numerics("TPU v5p") == "int8"
  assert kernel_tpu.default_numerics("TPU v5 lite") == "int8"
  assert kernel_tpu.default_numerics("TPU v6 lite") == "int8"
  assert kernel_tpu.default_numerics("TPU7x") == "fp8"
  assert kernel_tpu.default_numerics("cpu") == "fp8"
  with pytest.raises(ValueError, match="numerics"):
    kernel_tpu.prepare(*_inputs(1, 8, 128, j=8), "fp16")
  with pytest.raises(ValueError, match="block_k"):
    kernel_tpu.BlockSizes(block_q=8, block_k=64)
  with pytest.raises(ValueError, match="backend"):
    ops.indexer_logits(*_inputs(1, 8, 128, j=8), impl="pallas", backend="rocm")


@pytest.mark.parametrize("numerics", kernel_tpu.NUMERICS)
def test_export_tpu_full_v32_shape(numerics):
  l, j, d = 32768, 64, 128
  sds = jax.ShapeDtypeStruct
  args = (
    sds((1, l, j, d), jnp.bfloat16),
    sds((1, l, d), jnp.bfloat16),
    sds((1, l, j), jnp.float32),
  )
  f = lambda q, k, w: ops.indexer_logits(q, k, w, impl="pallas", backend="tpu", numerics=numerics)
  mod = export.export(jax.jit(f), platforms=["tpu"])(*args).mlir_module()
  assert "indexer_logits_tpu" in mod


@pytest.mark.tpu
@pytest.mark.parametrize("numerics", kernel_tpu.NUMERICS)
def test_on_tpu(numerics):
  q, k, w = _inputs(1, 1024, 4096)
  out = ops.indexer_logits(q, k, w, impl="pallas", numerics=numerics)
  emu = kernel_tpu.emulate_logits(q, k, w, numerics)
  fin = np.isfinite(np.asarray(emu))
  assert _testing.rel_err(np.where(fin, out, 0), np.where(fin, emu, 0)) < 1e-4
