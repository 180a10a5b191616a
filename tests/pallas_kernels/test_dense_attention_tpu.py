# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""TPU splash attention for the dense phase (pallas_kernels/dense_attention/kernel_tpu.py):
interpret mode against the chunked XLA reference, the device rule, TPU lowering at V3.2 shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsa_jax import sparse_attention
from pallas_kernels.dense_attention import kernel_tpu


def _inputs(b, t, h, kd, vd, mqa, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  kv_shape = (b, t) if mqa else (b, t, h)
  q = jax.random.normal(ks[0], (b, t, h, kd), dtype)
  k = jax.random.normal(ks[1], kv_shape + (kd,), dtype)
  v = jax.random.normal(ks[2], kv_shape + (vd,), dtype)
  return q, k, v


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize(
  "mqa,kd,vd,dtype,tol",
  [
    (False, 192, 128, jnp.float32, 1e-5),
    pytest.param(True, 72, 64, jnp.float32, 1e-5, marks=pytest.mark.slow),
    pytest.param(False, 64, 64, jnp.bfloat16, 2e-2, marks=pytest.mark.slow),
  ],
)
def test_interpret_matches_reference(mqa, kd, vd, dtype, tol):
  """Output, f32 lse and the vjp (random cotangent) against the chunked XLA path; 2 x 2 tiles
  of 128, so the causal block skipping is exercised."""
  q, k, v = _inputs(1, 256, 1, kd, vd, mqa, dtype)
  scale = kd**-0.5
  ct = jax.random.normal(jax.random.key(9), q.shape[:3] + (vd,))
  kern = functools.partial(kernel_tpu.causal_attention, scale=scale, interpret=True, block=128)
  ref = functools.partial(sparse_attention.dense_attention, scale=scale, block_t=128)
  out, lse = kern(q, k, v)
  want, want_lse = ref(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
  assert _rel(out, want) < tol and _rel(lse, want_lse) < tol
  loss = lambda fn: lambda q, k, v: jnp.sum(ct * fn(q, k, v)[0])
  got_g = jax.grad(loss(functools.partial(kern, with_lse=False)), (0, 1, 2))(q, k, v)
  want_g = jax.grad(loss(ref), (0, 1, 2))(q, k, v)
  for g, w in zip(got_g, want_g):
    assert _rel(g, w) < tol


def test_rules():
  q, k, v = _inputs(1, 256, 2, 64, 64, False, jnp.float32)
  assert kernel_tpu.supported(q, k, v, interpret=True) is None
  assert "T = S" in kernel_tpu.supported(q[:, :128], k, v, interpret=True)
  assert "multiple" in kernel_tpu.supported(q[:, :200], k[:, :200], v[:, :200], interpret=True)
  assert "multiple" in kernel_tpu.supported(q, k, v, interpret=True, block=192)
  # 8 CPU devices: outside a shard_map a pallas_call would run replicated
  assert "shard_map" in kernel_tpu.supported(q, k, v)
  with pytest.raises(ValueError, match="T = S"):
    kernel_tpu.causal_attention(q[:, :128], k, v, scale=0.1, interpret=True)


def test_inside_shard_map_over_batch():
  """Each of 8 devices runs the kernel on its batch row: same as the reference."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  q, k, v = _inputs(8, 128, 1, 32, 32, False, jnp.float32, seed=3)
  with jax.set_mesh(mesh):
    assert kernel_tpu.supported(q, k, v) is not None  # outside: refused

    def inner(q, k, v):
      assert kernel_tpu.supported(q, k, v) is None  # inside every axis: taken
      return kernel_tpu.causal_attention(q, k, v, scale=0.2, with_lse=False, interpret=True)[0]

    # splash's kernels carry no varying-axes annotations: check_vma off, as for any pallas_call
    spec = (P("data"),) * 3
    fn = jax.shard_map(inner, mesh=mesh, in_specs=spec, out_specs=P("data"), check_vma=False)
    got = jax.jit(fn)(q, k, v)
  want, _ = sparse_attention.dense_attention(q, k, v, scale=0.2, block_t=128)
  assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("mqa", [False, True])
def test_export_tpu_v32_shapes(mqa):
  """Value and gradient lower for TPU at V3.2's shapes: MHA (H 128, K 192, V 128) and the
  absorbed MQA form with lse (K 576, V 512), L 4096, bf16."""
  t, h = 4096, 128
  kd, vd = (576, 512) if mqa else (192, 128)
  sds = jax.ShapeDtypeStruct
  kv = (1, t) if mqa else (1, t, h)
  args = (sds((1, t, h, kd), jnp.bfloat16), sds(kv + (kd,), jnp.bfloat16))
  args += (sds(kv + (vd,), jnp.bfloat16),)

  def loss(q, k, v):
    out, lse = kernel_tpu.causal_attention(q, k, v, scale=kd**-0.5, with_lse=mqa)
    return jnp.sum(out.astype(jnp.float32)) + (jnp.sum(lse) if mqa else 0.0)

  mesh = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
  f = jax.shard_map(
    jax.value_and_grad(loss, (0, 1, 2)),
    mesh=mesh,
    in_specs=(P(),) * 3,
    out_specs=P(),
    check_vma=False,
  )
  exp = jax.export.export(jax.jit(f), platforms=["tpu"])(*args)
  assert [a.shape for a in exp.out_avals] == [(), args[0].shape, args[1].shape, args[2].shape]
  assert exp.mlir_module().count("tpu_custom_call") >= 3 + mqa  # fwd, dq, dkv (+ fwd with lse)
