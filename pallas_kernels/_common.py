# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Small helpers shared by the kernels and references: query-block chunking that never builds [T, S]
at once, the live chunks of a token's slot ids."""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# The jax.checkpoint name of what a custom VJP's forward computes for its backward (outputs, lse,
# row statistics; not its inputs). Under remat_policy="save_attention" (dsa_jax.sparse_attention.
# REMAT_POLICIES) a block keeps these, so the backward does not run the kernel's forward a second time.
SAVED = "attention_saved"
# The sparse attention kernels' outputs [T, H, V] among those residuals: by far the largest (8 GiB a
# layer at V3.2's shape and 64K tokens), so a policy may keep SAVED without them
# (remat_policy="save_selection": the backward reruns the attention forward, not the top-k).
SAVED_OUT = "attention_out"
# Every projection's output (dsa_jax.layers.Linear) under remat_policy="save_projections": the
# backward then replays no matmul of the block, only its elementwise ops.
SAVED_PROJ = "projection_out"


def saved(tree, name=SAVED):
  """tree with every array leaf named `name` for jax.checkpoint policies (None leaves stay None).

  The leaves pass an optimization barrier first. A saved value inside a scanned layer is written
  into the scan's stacked residuals by a dynamic-update-slice; when it comes straight from a
  custom call (a Mosaic GPU or cuDNN kernel) that also feeds the layer, XLA's GPU dynamic-slice
  fusion clones the call into the in-place write and runs the kernel twice. The barrier leaves it
  one producer, so the kernel runs once."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  leaves = jax.lax.optimization_barrier(leaves)
  return jax.tree_util.tree_unflatten(treedef, [checkpoint_name(x, name) for x in leaves])


# Pallas-Triton lowers jnp.exp / jnp.log on f32 to libdevice's accurate expf / logf (a dozen
# instructions each); exp2 / log2 lower to the hardware's ex2.approx / lg2.approx (2 ulp). The
# kernels' per-head softmax terms use these, with log2(e) folded into their scales where they can.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def exp(x):
  """e**x as 2**(x·log2 e)."""
  return jnp.exp2(x * jnp.float32(LOG2E))


def log(x):
  """ln x as log2(x)·ln 2."""
  return jnp.log2(x) * jnp.float32(LN2)


def exp_rows(x, scale: float, shift):
  """e**(scale·x - shift[:, None]) for x [n, m], shift [n] (a softmax term given its row's lse),
  with log2(e) folded into the scale: one FMA and one ex2 per element."""
  return jnp.exp2(x * jnp.float32(scale * LOG2E) - (shift * jnp.float32(LOG2E))[:, None])


def per_device() -> bool:
  """True where a pallas_call runs as written: one device, or inside a shard_map over every axis
  of the mesh (each device runs its part). Elsewhere a sharded jit would run it replicated, since
  a pallas_call is not auto-partitioned."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.device_count() == 1 or (not mesh.empty and mesh.are_all_axes_manual)


def pad_axis(x, axis: int, multiple: int, value=0):
  """Pads `axis` of x up to a multiple of `multiple` with `value`."""
  n = x.shape[axis]
  pad = (-n) % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def map_query_blocks(fn, block_t: int, xs, t_axis: int = 1, remat: bool = True):
  """Applies fn to query blocks of every array in xs (split on t_axis), concatenating the results.

  Uses lax.map (a scan) so only one block's intermediates live at a time; with remat the backward
  pass also re-computes per block instead of storing every block's residuals.
  """
  t = xs[0].shape[t_axis]
  if t <= block_t:
    return fn(*xs)
  n = -(-t // block_t)
  padded = [pad_axis(x, t_axis, block_t) for x in xs]

  def split(x):
    x = jnp.moveaxis(x, t_axis, 0)
    x = x.reshape((n, block_t) + x.shape[1:])
    return x

  blocks = [split(x) for x in padded]
  body = (
    jax.checkpoint(lambda args: fn(*[jnp.moveaxis(a, 0, t_axis) for a in args]))
    if remat
    else (lambda args: fn(*[jnp.moveaxis(a, 0, t_axis) for a in args]))
  )
  out = jax.lax.map(lambda args: body(args), blocks)

  def merge(y):
    y = jnp.moveaxis(y, t_axis + 1, 1)  # [n, tb, ...]
    y = y.reshape((n * block_t,) + y.shape[2:])
    y = jnp.moveaxis(y, 0, t_axis)
    return jax.lax.slice_in_dim(y, 0, t, axis=t_axis)

  return jax.tree.map(merge, out)


def live_chunks(idx, bk: int, multiple: int = 1):
  """idx [N, kp] slot ids (< 0 invalid) -> [N] int32: the chunks of bk slots the kernels run
  for each token, up to the last one that holds a valid id, rounded up to `multiple` and at least
  `multiple`. The chunks after it hold only invalid slots and add nothing, so the kernels skip
  them: top-k puts a row's unused slots (-1) at its end, and in a causal sequence query t < k has
  k - t - 1 of them (docs/architecture.md, Kernels). The GPU and TPU sparse MLA kernels read it
  per token."""
  pos = jnp.arange(idx.shape[1], dtype=jnp.int32)
  last = jnp.max(jnp.where(idx >= 0, pos, -1), axis=1)  # -1: no valid slot
  chunks = jnp.maximum(last // bk + 1, 1)  # (-1) // bk + 1 = 0
  return (chunks + multiple - 1) // multiple * multiple
