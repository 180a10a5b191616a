# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""V4 sink attention on the TPU sparse-attention kernels: f32 (and bf16) under the TPU interpreter
(out-of-bounds reads raise, uninitialised memory is NaN) vs the reference, forward and jax.vjp
gradients (q, rows, sink) with both cotangents; TPU lowering at V4-Flash shapes.

The interpreter costs ~13 ms per gathered row, so shapes are tiny (one 128-slot chunk a token).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _testing
from pallas_kernels.v4_attention import ops

SCALE = 0.1
INTERPRET = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")
SINKS = [0.0, 40.0, -60.0, 1.5, -1.0, 3.0, 0.5, -2.5]  # as test_v4_attention.py


def _compare(fp, fr, args, seed, dtype):
  (o, l), vjp = jax.vjp(jax.jit(fp), *args)
  (ro, rl), rvjp = jax.vjp(jax.jit(fr), *args)
  tol = _testing.tolerances(dtype)
  assert o.shape == ro.shape and o.dtype == ro.dtype and l.dtype == jnp.float32
  errs = {"out": _testing.rel_err(o, ro)}
  assert errs["out"] < tol, errs
  np.testing.assert_array_equal(np.isinf(l), np.isinf(rl))
  fin = np.isfinite(rl)
  lse_tol = 1e-5 if dtype == jnp.float32 else 2e-3
  np.testing.assert_allclose(np.asarray(l)[fin], np.asarray(rl)[fin], atol=lse_tol, rtol=lse_tol)
  do = _testing.normal(seed, o.shape, o.dtype)
  dl = jnp.where(fin, _testing.normal(seed + 1, l.shape), 0.0)  # the lse cotangent too
  for name, g, rg in zip(("dq", "dkv", "dckv", "dsink"), vjp((do, dl)), rvjp((do, dl))):
    if len(args) == 3 and name == "dckv":  # sink_attention: (q, kv, sink)
      name = "dsink"
    assert g.shape == rg.shape and g.dtype == rg.dtype
    assert np.isfinite(np.asarray(g, np.float32)).all(), name
    errs[name] = _testing.rel_err(g, rg)
    assert errs[name] < 2 * tol, (name, errs)
  return (o, l), errs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sink_attention_tpu_interpret(dtype):
  # k = 50 > S = 20 (every row, with repeats; 50 -> 128 slots), ids < 0 and >= S, duplicates, a
  # row with no valid slot (out 0, lse = the sink), large / very negative sinks.
  b, t, h, k_dim, s, k = 1, 2, 8, 128, 20, 50
  q = _testing.normal(0, (b, t, h, k_dim), dtype)
  kv = _testing.normal(1, (b, s, k_dim), dtype)
  sink = jnp.asarray(SINKS, jnp.float32)
  idx = jax.random.randint(jax.random.key(2), (b, t, k), -3, s + 3, jnp.int32)
  idx = idx.at[0, 0].set(-1).at[0, 1, :6].set(7)
  kw = dict(scale=SCALE)
  fp = lambda q, kv, a: ops.sink_attention(
    q, kv, idx, a, impl="pallas", backend="tpu", interpret=INTERPRET, **kw
  )
  fr = lambda q, kv, a: ops.sink_attention(q, kv, idx, a, **kw)
  (o, l), errs = _compare(fp, fr, (q, kv, sink), seed=3, dtype=dtype)
  print(f"sink_attention tpu interpret {jnp.dtype(dtype).name} rel errs", errs)
  np.testing.assert_array_equal(np.asarray(o[0, 0], np.float32), 0.0)
  np.testing.assert_allclose(l[0, 0], sink)


def test_v4_attention_selected_tpu_interpret_f32():
  """window ∪ selected entries through one index buffer, f32 (T = 5, m = 4: query 3 and 4 see
  entry 0; ids not yet visible and duplicates)."""
  b, t, h, k_dim, w, m = 1, 5, 8, 128, 2, 4
  q = _testing.normal(10, (b, t, h, k_dim))
  kv = _testing.normal(11, (b, t, k_dim))
  ckv = _testing.normal(12, (b, 1, k_dim))
  sink = jnp.asarray(SINKS, jnp.float32)
  idx = jnp.asarray([[[0, -1, 1], [0, 0, -1], [1, 0, 0], [0, 0, 1], [-1, 0, 3]]], jnp.int32)
  kw = dict(scale=SCALE, window=w, ratio=m, idx=idx)
  fp = lambda q, kv, c, a: ops.v4_attention(
    q, kv, a, ckv=c, impl="pallas", backend="tpu", interpret=INTERPRET, **kw
  )
  fr = lambda q, kv, c, a: ops.v4_attention(q, kv, a, ckv=c, **kw)
  _, errs = _compare(fp, fr, (q, kv, ckv, sink), seed=13, dtype=jnp.float32)
  print("v4_attention[selected] tpu interpret f32 rel errs", errs)


def test_export_tpu_v4_flash_shapes():
  """A CSA layer's attention (window 128 + top-512 entries, H = 64, K = V = 512) lowers through
  Mosaic TPU, forward and backward."""
  t, h, k_dim, w, m, topk = 4096, 64, 512, 128, 4, 512
  sds = jax.ShapeDtypeStruct
  q, kv = sds((1, t, h, k_dim), jnp.bfloat16), sds((1, t, k_dim), jnp.bfloat16)
  ckv, idx = sds((1, t // m, k_dim), jnp.bfloat16), sds((1, t, topk), jnp.int32)
  sink = sds((h,), jnp.float32)
  fwd = functools.partial(
    ops.v4_attention, scale=k_dim**-0.5, window=w, ratio=m, impl="pallas", backend="tpu"
  )

  def grads(q, kv, ckv, idx, a):
    f = lambda q, kv, ckv, a: fwd(q, kv, a, ckv=ckv, idx=idx)
    (o, l), vjp = jax.vjp(f, q, kv, ckv, a)
    return vjp((o, jnp.ones_like(l)))

  mod = jax.export.export(jax.jit(grads), platforms=["tpu"])(q, kv, ckv, idx, sink).mlir_module()
  assert "sparse_mla_fwd_tpu" in mod and "sparse_mla_bwd_tpu" in mod
