# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Where the GPU kernels' default dispatch may run a pallas_call (pallas_kernels._common.
per_device): one device, or inside a shard_map over the whole mesh; not under a sharded jit,
which would run it replicated. Checked on the CPU's 8 devices, with the backend reported as a GPU
so the GPU ops' default decisions (`*_why`) can be read."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from pallas_kernels import _common
from pallas_kernels.lightning_indexer import ops as indexer_ops

sds = jax.ShapeDtypeStruct


def _inside(mesh, fn, **kw):
  seen = []

  def body(x):
    seen.append(fn())
    return x

  spec = P()  # replicated in and out: every mesh axis is still manual inside
  f = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, **kw)
  jax.jit(f).lower(jnp.zeros(mesh.devices.size))  # tracing is enough: the rule reads the trace
  return seen[0]


def test_per_device_rule():
  if jax.device_count() < 8:
    pytest.skip("needs the 8 CPU devices of the test command")
  assert not _common.per_device()  # 8 devices, no shard_map
  assert _inside(jax.make_mesh((8,), ("d",)), _common.per_device)
  # manual over one of two axes: the other is still auto-partitioned
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  assert not _inside(mesh, _common.per_device, axis_names={"a"})
  assert _inside(mesh, _common.per_device)


def test_kl_kernels_run_per_device_in_a_shard_map(monkeypatch):
  """The sparse-KL kernels' default (one GPU) also holds per device inside a whole-mesh
  shard_map, e.g. the context-parallel sparse path; outside one they are refused."""
  if jax.device_count() < 8:
    pytest.skip("needs the 8 CPU devices of the test command")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(indexer_ops, "SPARSE_KL_KERNELS_BY_DEFAULT", True)
  q, k = sds((1, 256, 64, 128), jnp.bfloat16), sds((1, 256, 128), jnp.bfloat16)
  why = lambda: indexer_ops.sparse_kl_kernels_why(q, k)
  assert "several devices" in why()
  assert _inside(jax.make_mesh((8,), ("d",)), why) is None
