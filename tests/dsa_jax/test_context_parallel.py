# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Context parallelism keeps the fused Pallas top-k: 8 sequence shards select exactly the indices
of one device. The select kernel runs in interpret mode; a jnp stand-in for the FP8 logits kernel
(exact on integer inputs) keeps the test fast, and both sides use it."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsa_jax import context_parallel
from pallas_kernels.lightning_indexer import kernel_mosaic_gpu as lik
from pallas_kernels.lightning_indexer import ops as indexer_ops
from pallas_kernels.topk import kernel_triton as topk_kernel


def _logits(q8, k8, wq, ks, *, block_sizes, causal=True, q_offset=None, interpret=None):
  del block_sizes, interpret
  z = jnp.einsum("btjd,bsd->btjs", q8.astype(jnp.float32), k8.astype(jnp.float32))
  out = jnp.einsum("btj,btjs->bts", wq, jnp.maximum(z, 0.0)) * ks[:, None, :]
  if causal:
    pos = q_offset + jnp.arange(q8.shape[1])
    out = jnp.where(jnp.arange(k8.shape[1])[None, None] <= pos[None, :, None], out, -jnp.inf)
  return out


def test_sequence_shards_select_like_one_device(monkeypatch):
  monkeypatch.setattr(lik, "logits_fp8", _logits)
  n = 8
  rng = np.random.default_rng(0)
  b, t, j, d, topk = 1, 256, lik.HEADS, lik.DIM, 24
  q = jnp.asarray(rng.integers(-3, 4, (b, t, j, d)), jnp.float32)
  k = jnp.asarray(rng.integers(-3, 4, (b, t, d)), jnp.float32)
  w = jnp.asarray(rng.integers(-2, 3, (b, t, j)), jnp.float32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("sequence",))

  def body(q, k, w):
    k = jax.lax.all_gather(k, "sequence", axis=1, tiled=True)
    offset = jax.lax.axis_index("sequence") * q.shape[1]
    return context_parallel.topk_at_offset(
      q, k, w, offset=offset, topk=topk, block_t=t // n, impl="pallas", interpret=True
    )

  spec = P(None, "sequence")
  sharded = jax.shard_map(
    body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False
  )
  try:
    got = np.asarray(jax.jit(sharded)(q, k, w))
    one = np.asarray(
      indexer_ops.indexer_topk(q, k, w, topk=topk, impl="pallas", interpret=True, block_t=32)
    )
  finally:
    topk_kernel.indexer_topk_blocked.clear_cache()  # the jit cache holds the stand-in
  assert got.shape == (b, t, topk)
  np.testing.assert_array_equal(got, one)
  # early rows hold fewer than topk keys: -1 pads exactly past position + 1
  n_valid = (got >= 0).sum(-1)
  np.testing.assert_array_equal(n_valid[0], np.minimum(np.arange(t) + 1, topk))
