# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Grouped matmul Pallas-Triton kernels (grouped_matmul/kernel_triton.py): interpret mode vs
ragged_dot (value and both gradients) at awkward group layouts, dispatch and errors of ops.gmm,
the MoE layer on the kernels, cuda lowering at the V3.2 expert shapes, and a GPU test."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import triton as pltriton
from jax.sharding import PartitionSpec as P

from pallas_kernels._testing import export_cuda, rel_err
from pallas_kernels.grouped_matmul import kernel_triton, ops, reference

SMALL = kernel_triton.BlockSizes(16, 16, 16, 16, 16, 16)


def _case(seed, m, k, n, sizes, dtype=jnp.float32):
  """Inputs made in numpy (eager jax ops would each compile: seconds on a loaded CPU)."""
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape, np.float32)
  lhs, rhs, ct = f(m, k), f(len(sizes), k, n), f(m, n)
  return (
    jnp.asarray(lhs, dtype),
    jnp.asarray(rhs, dtype),
    jnp.asarray(sizes, jnp.int32),
    jnp.asarray(ct),
  )


def _value_and_vjp(fn, lhs, rhs, ct):
  out, vjp = jax.vjp(fn, lhs, rhs)
  return out, vjp(ct)


def _check(args, bsz, tol=1e-5):
  """Output and the vjp (d_lhs, d_rhs) with a random cotangent: kernels vs ragged_dot in f32."""
  lhs, rhs, gs, ct = args
  kern = lambda a, b: ops.gmm(
    a, b, gs, preferred_element_type=jnp.float32, impl="pallas", interpret=True, block_sizes=bsz
  )
  ref = lambda a, b: reference.gmm_reference(a, b, gs, preferred_element_type=jnp.float32)
  got, got_g = jax.jit(lambda a, b: _value_and_vjp(kern, a, b, ct))(lhs, rhs)
  f32 = lambda x: x.astype(jnp.float32)
  want, want_g = jax.jit(lambda a, b: _value_and_vjp(ref, a, b, ct))(f32(lhs), f32(rhs))
  assert got.dtype == jnp.float32
  assert rel_err(got, want) < tol
  for name, g_, w_ in zip(("lhs", "rhs"), got_g, want_g):
    assert g_.dtype == lhs.dtype, name
    assert rel_err(g_, w_) < tol, name
  total = int(np.sum(np.asarray(gs)))
  if total < lhs.shape[0]:  # rows past Σ group_sizes: zero output, zero d_lhs
    assert not np.any(np.asarray(got)[total:])
    assert not np.any(np.asarray(got_g[0], np.float32)[total:])


# (seed, M, K, N, group sizes), BlockSizes
CASES = {
  # an empty group, sizes not multiples of the tile, M = 100 not a multiple of 16, Σ = 85 < M,
  # K and N padded to the tiles
  "ragged_trailing": ((0, 100, 40, 24, (30, 0, 45, 10)), SMALL),
  # one group holds every row, empty groups on both sides
  "one_group": ((1, 64, 32, 48, (0, 64, 0)), SMALL),
  # E = 1, M = 50 (a partial last tile)
  "e1": ((2, 50, 16, 16, (50,)), SMALL),
  # many groups inside one tile; gmm and tgmm tiles of different sizes, reduction in 2+ chunks
  "many_in_a_tile": (
    (3, 72, 48, 40, (3, 5, 0, 17, 1, 9, 30)),
    kernel_triton.BlockSizes(32, 16, 32, 16, 32, 16),
  ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_ragged_dot(name):
  case, bsz = CASES[name]
  _check(_case(*case), bsz)


def test_interpret_bf16():
  """bf16 operands: bf16 dots with f32 accumulation; the f32 cotangent is cast to bf16."""
  _check(_case(4, 80, 32, 32, (20, 0, 33, 20), jnp.bfloat16), SMALL, tol=1e-2)


def test_masked_reference_agrees_with_ragged_dot():
  """The two references: ragged_dot leaves rows past Σ group_sizes zero, like the masked form."""
  lhs, rhs, gs, ct = _case(5, 40, 16, 8, (7, 0, 20))
  np.testing.assert_allclose(
    reference.gmm_reference(lhs, rhs, gs), reference.gmm_masked(lhs, rhs, gs), rtol=1e-5, atol=1e-5
  )
  d_rhs = jax.vjp(lambda b: reference.gmm_reference(lhs, b, gs), rhs)[1](ct[:, :8])[0]
  np.testing.assert_allclose(d_rhs, reference.tgmm_masked(lhs, ct[:, :8], gs), rtol=1e-5, atol=1e-5)


def test_work_items():
  """Each (row tile, group) pair once, straddling tiles once per group, trailing rows group E."""
  meta = np.asarray(kernel_triton.work_items(jnp.asarray([3, 0, 14, 16], jnp.int32), 35, 48, 16))
  items = [
    tuple(int(v) for v in meta[:, i]) for i in range(meta.shape[1]) if meta[3, i] > meta[2, i]
  ]
  # (tile, group, first row, end row)
  want = [
    (0, 0, 0, 3),
    (0, 2, 3, 16),
    (1, 2, 16, 17),
    (1, 3, 17, 32),
    (2, 3, 32, 33),
    (2, 4, 33, 48),
  ]
  assert items == want
  assert meta.shape == (4, 48 // 16 + 4)


def test_dispatch_and_errors(monkeypatch):
  lhs, rhs, gs, _ = _case(0, 16, 16, 16, (8, 8))
  jaxpr = lambda **kw: str(jax.make_jaxpr(lambda a, b: ops.gmm(a, b, gs, **kw))(lhs, rhs))
  assert "ragged_dot" in jaxpr() and "pallas_call" not in jaxpr()
  # CPU without interpret: ragged_dot, no error
  assert "ragged_dot" in jaxpr(impl="pallas") and "pallas_call" not in jaxpr(impl="pallas")
  assert "pallas_call" in jaxpr(impl="pallas", interpret=True)
  with pytest.raises(ValueError, match="no GPU"):
    ops.gmm(lhs, rhs, gs, impl="pallas", block_sizes=kernel_triton.BlockSizes())
  with pytest.raises(ValueError, match="dtype int32"):
    ops.gmm(lhs.astype(jnp.int32), rhs, gs, impl="pallas", interpret=True)
  with pytest.raises(ValueError, match="K=16 != rhs K=8"):
    ops.gmm(lhs, rhs[:, :8], gs)
  with pytest.raises(ValueError, match="2 groups, rhs 1"):
    ops.gmm(lhs, rhs[:1], gs)
  with pytest.raises(ValueError, match="impl="):
    ops.gmm(lhs, rhs, gs, impl="triton")
  with pytest.raises(ValueError, match="power of 2"):
    kernel_triton.BlockSizes(block_m=48)
  # As on a GPU host with 8 devices and the kernels on by default: outside a shard_map
  # ragged_dot (a pallas_call is not auto-partitioned), inside one over the whole mesh the kernels.
  monkeypatch.setattr(ops, "GMM_KERNELS_BY_DEFAULT", True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert "pallas_call" not in jaxpr(impl="pallas")
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  body = lambda a, b: ops.gmm(a, b, gs, impl="pallas")
  fn = jax.shard_map(body, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False)
  assert "pallas_call" in str(jax.make_jaxpr(fn)(lhs, rhs))


def _moe_grads(impl, x, mesh=None):
  """Gradients of a scalar of the MoE layer's output (test preset) w.r.t. params and x."""
  import dsa_jax  # noqa: PLC0415
  from dsa_jax import moe, sharding  # noqa: PLC0415

  layer = moe.MoE(dsa_jax.preset("test", impl=impl), rngs=nnx.Rngs(0))
  graph, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    y, _ = nnx.merge(graph, params, rest)(x)
    return jnp.sum(y * jnp.cos(y))

  grad = jax.grad(loss, (0, 1))
  if mesh is None:
    return jax.jit(grad)(params, x)
  with sharding.use_mesh_rules(mesh, sharding.DEFAULT_RULES):
    return jax.jit(grad)(params, x)


@pytest.mark.parametrize("mesh", [None, {"expert": 4, "data": 2}])
def test_moe_layer_on_the_kernels(monkeypatch, mesh):
  """The MoE layer's gradients with its grouped GEMMs on the kernels (interpret) equal the
  ragged_dot ones: one device, and expert-parallel (the kernels inside expert_parallel's
  shard_map, with empty slots sorted past Σ group sizes). Test preset: E = 8, k = 2, f32."""
  from dsa_jax import sharding  # noqa: PLC0415

  mesh = mesh and sharding.make_mesh(mesh)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 24, 64), np.float32))
  want = _moe_grads("reference", x, mesh)
  gmm, calls = ops.gmm, []

  def kernels(*a, impl, **kw):
    calls.append(impl)
    return gmm(*a, impl=impl, interpret=impl == "pallas", **kw)

  monkeypatch.setattr(ops, "gmm", kernels)
  got = _moe_grads("pallas", x, mesh)
  assert calls == ["pallas"] * 3
  for g_, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(g_, w_) < 1e-5


def _export_cuda(f, *avals):
  return export_cuda(f, *avals)


V32 = dict(e=8, m=131072, k=7168, n=2048)  # 8 local experts, 16K tokens x 8 copies, D, F


def test_export_cuda_v32_shapes(monkeypatch, triton_verified):
  """Value and gradient of D -> F -> D through two grouped matmuls lower for cuda at the V3.2
  expert shapes: 6 Triton calls (2 gmm, 2 dlhs, 2 tgmm), each Triton module passes the MLIR
  verifier, and no tensor in the module is bigger than [M, D] (ragged_dot's GPU lowering holds
  [E, M, *])."""
  verified = triton_verified
  e, m, k, n = V32["e"], V32["m"], V32["k"], V32["n"]
  sds = jax.ShapeDtypeStruct
  f32 = jnp.dtype(jnp.float32)

  def loss(x, w1, w2, gs):
    bsz = kernel_triton.BlockSizes()
    h = kernel_triton.gmm(x, w1, gs, f32, bsz, False)
    y = kernel_triton.gmm(h.astype(x.dtype), w2, gs, f32, bsz, False)
    return jnp.sum(y)

  args = (
    sds((m, k), jnp.bfloat16),
    sds((e, k, n), jnp.bfloat16),
    sds((e, n, k), jnp.bfloat16),
    sds((e,), jnp.int32),
  )
  exp = _export_cuda(jax.value_and_grad(loss, (0, 1, 2)), *args)
  assert [a.shape for a in exp.out_avals] == [(), (m, k), (e, k, n), (e, n, k)]
  assert [a.dtype for a in exp.out_avals] == [jnp.float32] + [jnp.bfloat16] * 3
  text = exp.mlir_module()
  assert text.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 6
  assert verified == [True] * 6
  sizes = [np.prod([int(d) for d in s.split("x")]) for s in re.findall(r"tensor<([0-9x]+)x", text)]
  assert max(sizes) == m * k


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_gpu_matches_ragged_dot(dtype, tol):
  """Mid shape on the GPU (E = 8, empty and straddling groups, trailing rows): the kernels
  against ragged_dot in f32 at highest precision, value and both gradients."""
  sizes = (700, 0, 1500, 129, 1, 900, 600, 64)  # Σ = 3894 < M = 4000
  args = _case(7, 4000, 1024, 512, sizes, dtype)
  with jax.default_matmul_precision("highest"):
    _check(args, kernel_triton.BlockSizes(), tol)  # opt in: not the default until this passes


@pytest.mark.gpu
def test_gpu_v32_shape():
  """The V3.2 expert shapes (M = 131072 copies, D = 7168, F = 2048, bf16) forward and backward on
  one GPU: runs, matches per-group dense dots, and the compiled step holds no [E, M, *] buffer."""
  import time  # noqa: PLC0415

  e, m, k, n = V32["e"], V32["m"], V32["k"], V32["n"]
  rng = np.random.default_rng(8)
  sizes = rng.multinomial(m - 1000, np.full(e, 1.0 / e)).astype(np.int32)  # 1000 trailing rows
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  w1 = (jax.random.normal(keys[1], (e, k, n)) * k**-0.5).astype(jnp.bfloat16)
  w2 = (jax.random.normal(keys[2], (e, n, k)) * n**-0.5).astype(jnp.bfloat16)
  ct = jax.random.normal(keys[3], (m, k), jnp.float32)
  gs = jnp.asarray(sizes)
  bsz = kernel_triton.BlockSizes()

  def chain(gmm):
    def f(x, w1, w2):
      h = gmm(x, w1)
      return gmm(jax.nn.silu(h).astype(x.dtype), w2)

    return jax.jit(lambda x, w1, w2, ct: _value_and_vjp_3(f, x, w1, w2, ct))  # ct: an argument

  kern = chain(
    lambda a, b: ops.gmm(
      a, b, gs, preferred_element_type=jnp.float32, impl="pallas", block_sizes=bsz
    )
  )
  compiled = kern.lower(x, w1, w2, ct).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < e * m * n * 4, temp  # one [E, M, F] f32 buffer would be 8.6 GB
  got = jax.block_until_ready(compiled(x, w1, w2, ct))
  t0 = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(compiled(x, w1, w2, ct))
  ms = (time.perf_counter() - t0) / 3 * 1e3
  print(f"gmm chain fwd+bwd {ms:.1f} ms, {6 * 2 * m * k * n / ms / 1e9:.0f} TFLOP/s, temp {temp}")

  # Each group's output rows, dx rows and dw1/dw2 depend on that group alone, so a few groups
  # (first, last, an empty-or-small one, a middle one) checked against dense dots are exact checks
  # without compiling 256 of them.
  ends = np.cumsum(sizes)
  starts = ends - sizes
  (out, (dx, dw1, dw2)) = jax.tree.map(np.asarray, got)
  for g in sorted({0, e - 1, int(np.argmin(sizes)), e // 2}):
    lo, hi = int(starts[g]), int(ends[g])

    def dense(xg, w1g, w2g):
      h = jnp.dot(xg.astype(jnp.float32), w1g.astype(jnp.float32))
      return jnp.dot(jax.nn.silu(h).astype(x.dtype).astype(jnp.float32), w2g.astype(jnp.float32))

    w_out, (w_dx, w_dw1, w_dw2) = jax.jit(lambda a, b, c, d: _value_and_vjp_3(dense, a, b, c, d))(
      x[lo:hi], w1[g], w2[g], ct[lo:hi]
    )
    for got_g, want_g in ((out[lo:hi], w_out), (dx[lo:hi], w_dx), (dw1[g], w_dw1), (dw2[g], w_dw2)):
      if want_g.size:
        assert rel_err(got_g, want_g) < 2e-2, g
  assert np.all(out[m - 1000 :] == 0) and np.all(dx[m - 1000 :] == 0)  # rows past every group


def _value_and_vjp_3(fn, x, w1, w2, ct):
  out, vjp = jax.vjp(fn, x, w1, w2)
  return out, vjp(ct)
