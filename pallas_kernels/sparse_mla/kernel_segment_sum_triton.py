# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Pallas-Triton segment sum of gathered rows: the second pass of the sorted key-row gradient
reductions (dkv of the sparse-MLA backward, ops._bwd_blocked; dk of the sparse indexer KL
backward, lightning_indexer/kernel_sparse_kl_triton.py).

  out[r, :] = init[r, :] + sum over i in [starts[r], starts[r + 1]) of rows[order[i], :]

rows [M, C] (bf16/f16/f32), order [P] int32 positions in [0, M) sorted by the row they add to,
starts [R + 1] int32 (CSR offsets into order), init [R, C] f32 -> out [R, C] f32 (init's
buffer, aliased).

One program per output row r: it walks its segment `block_r` positions at a time (the
positions read once for every column), gathers those positions' rows (by default each whole
row in one masked load of the next power of two >= C columns; or in `block_c`-column pieces,
one 2-D load per piece), sums them in f32 registers and writes the row once: no atomics, so
the adds are deterministic (in the order of `order`) and each output element is read and
written once. Rows with an empty segment keep init. The defaults (4 positions a step, whole
rows) are the fastest of the sweep at the sparse-MLA backward's shape
(experiments/sweep_segment_sum.py).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BLOCK_R = 4


def _kernel(rows_ref, order_ref, starts_ref, init_ref, out_ref, *, block_r, block_c):
  del init_ref  # aliased with out_ref: read through out_ref
  r = pl.program_id(0)
  lo, hi = starts_ref[r], starts_ref[r + 1]
  n_it = (hi - lo + block_r - 1) // block_r
  lane = jax.lax.broadcasted_iota(jnp.int32, (block_r,), 0)
  c_dim = out_ref.shape[1]
  if block_c > c_dim:  # whole rows: one masked load of block_c columns per position
    return _kernel_whole_rows(rows_ref, order_ref, out_ref, r, lo, hi, n_it, lane, block_c)
  pieces = [pl.ds(c, block_c) for c in range(0, c_dim, block_c)]

  def body(i, accs):
    at = lo + i * block_r + lane
    ok = at < hi
    pos = order_ref[jnp.where(ok, at, 0)]  # past the segment: position order[0], zeroed below
    out = []
    for acc, cols in zip(accs, pieces):
      x = rows_ref[pos, cols].astype(jnp.float32)
      out.append(acc + jnp.sum(jnp.where(ok[:, None], x, 0.0), axis=0))
    return tuple(out)

  zeros = tuple(jnp.zeros((block_c,), jnp.float32) for _ in pieces)
  accs = jax.lax.fori_loop(0, n_it, body, zeros)
  for acc, cols in zip(accs, pieces):
    out_ref[r, cols] = out_ref[r, cols] + acc


def _kernel_whole_rows(rows_ref, order_ref, out_ref, r, lo, hi, n_it, lane, block_c):
  """block_c > C: each position's row is one contiguous masked load (columns past C off)."""
  cols = jax.lax.broadcasted_iota(jnp.int32, (block_c,), 0)
  col_ok = cols < out_ref.shape[1]

  def body(i, acc):
    at = lo + i * lane.shape[0] + lane
    ok = at < hi
    pos = order_ref[jnp.where(ok, at, 0)]
    x = pltriton.load(
      rows_ref.at[pos[:, None], cols[None, :]], mask=ok[:, None] & col_ok[None, :], other=0
    )
    return acc + jnp.sum(x.astype(jnp.float32), axis=0)

  acc = jax.lax.fori_loop(0, n_it, body, jnp.zeros((block_c,), jnp.float32))
  dst = out_ref.at[r, cols]
  pltriton.store(dst, pltriton.load(dst, mask=col_ok, other=0.0) + acc, mask=col_ok)


@functools.partial(
  jax.jit, static_argnames=("block_r", "block_c", "num_warps", "num_stages", "interpret")
)
def segment_sum_rows(
  rows,
  order,
  starts,
  init,
  *,
  block_r=BLOCK_R,
  block_c=None,
  num_warps=4,
  num_stages=2,
  interpret=False,
):
  """See the module docstring. block_c: None (whole rows), a divisor of C, or a power of two > C
  (whole rows too)."""
  c = rows.shape[1]
  if block_c is None:
    block_c = pl.next_power_of_2(c)
  r = starts.shape[0] - 1
  whole = block_c > c and block_c & (block_c - 1) == 0
  if (c % block_c and not whole) or init.shape != (r, c) or order.ndim != 1:
    raise ValueError(
      f"segment_sum_rows: rows {rows.shape} (columns a multiple of {block_c}, or block_c a "
      "power of two above the columns), "
      f"order {order.shape}, starts {starts.shape}, init {init.shape}; expected init [R, C] with "
      "R = len(starts) - 1"
    )
  kern = functools.partial(_kernel, block_r=block_r, block_c=block_c)
  return pl.pallas_call(
    kern,
    out_shape=jax.ShapeDtypeStruct((r, c), jnp.float32),
    grid=(r,),
    input_output_aliases={3: 0},
    compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    interpret=interpret,
    name="segment_sum_rows",
  )(rows, order.astype(jnp.int32), starts.astype(jnp.int32), init.astype(jnp.float32))


def max_tokens(per_token: int) -> int:
  """The most tokens whose rows (`per_token` elements a token) stay below 2**31 elements, the
  int32 index range of segment_sum_rows' offsets."""
  if per_token >= 2**31:
    raise ValueError(f"one token's rows ({per_token} elements) exceed the int32 range")
  return (2**31 - 1) // per_token


def block_tokens(n: int, per_token: int) -> int:
  """Tokens per block for a caller that stores `per_token` row elements a token: the largest
  power of two, at most n and at most max_tokens(per_token)."""
  limit = max_tokens(per_token)
  nb = 1
  while nb * 2 <= min(n, limit):
    nb *= 2
  return nb


def sort_segments(ids, n_rows: int):
  """ids [P] int32 row ids (< 0 or >= n_rows: dropped) -> (order [P] positions sorted by id,
  starts [n_rows + 1]): the positions adding to row r are order[starts[r]:starts[r + 1]]."""
  key = jnp.where((ids >= 0) & (ids < n_rows), ids, n_rows).astype(jnp.int32)
  pos = jnp.arange(ids.shape[0], dtype=jnp.int32)
  key, order = jax.lax.sort((key, pos), num_keys=1)
  starts = jnp.searchsorted(key, jnp.arange(n_rows + 1, dtype=jnp.int32), side="left")
  return order, starts.astype(jnp.int32)
