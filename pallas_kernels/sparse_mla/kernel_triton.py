# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Triton-backend Pallas sparse MLA kernels (forward and backward) over gathered top-k rows.

Layout the wrappers hand to the kernels (batch folded into rows, see ops.py):
  q   [N, Hp, D]   N = B*T query tokens, heads padded to a multiple of block_h, D = da + db
  kv  [R, D]       R = B*S latent rows
  idx [N, kp]      int32 global row numbers (b*S + s), -1 for an invalid slot, kp % block_k == 0

Triton needs power-of-2 tensors, so the feature dim is split into `da` (a power of 2 >= d_v: the
value dims, also the first part of the logits; 512 for V3.2) and `db` (a power of 2 or 0: the rest
of the logit dims, 64 rope dims for V3.2). The gather is pointer style: each 64-slot chunk loads
`kv[rows, cols]` with 16-byte vector loads from every thread, and Triton's software pipeliner
overlaps the next chunk's loads with this chunk's two matmuls and the online softmax.

One program = one token x block_h heads; all value dims are in one program, so each chunk's rows
are gathered once and q·kᵀ is computed once (no value-dim split).

Backward (one program = one token x block_h heads): recompute P from the saved lse, dP = dO·Vᵀ,
dS = P ⊙ (dP - Δ + dlse); dq accumulates in registers; each chunk's dkv rows (dSᵀ·q + Pᵀ·dO) are
added to an f32 dkv with atomics (duplicate slots and other tokens' slots add up; invalid slots
go to a dummy row R that the wrapper drops).

Split backward (ops.py "hybrid" variants): `sparse_mla_bwd_dq_triton` is the same loop without
atomics; it writes dS (scale folded in) and P per slot in q.dtype, and `sparse_mla_dkv_triton`
then forms each token's dkv rows [dS;P]ᵀ·[q;dO] over all heads at once (one atomic per row and
column per slot, half the head-block kernel's) with relaxed-semantics atomics.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src.lib.triton import dialect as tt_dialect
from jax._src.pallas.triton import lowering as tt_lowering
from jax._src.pallas.triton import primitives as tt_primitives
from jax._src.state import discharge as state_discharge
from jax._src.state import primitives as state_primitives
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def _check_pow2(obj, names):
  for name in names:
    v = getattr(obj, name)
    if v < 16 or v & (v - 1):
      raise ValueError(f"{name}={v} must be a power of 2 >= 16")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Forward tiling. block_h: heads per program (dot M); block_k: slots per chunk.

  value_split: the value dims' accumulator as this many column tiles (each its own gather and
  dots), to give Triton smaller register tiles. prefetch_idx: load the next chunk's slot ids one
  iteration early (a loop carry), so the gather's addresses never wait on a load of the same
  iteration. (An L2 eviction hint on the gathers is dropped: Triton 3.6 pipelines them into
  cp.async without it, identical PTX.)
  """

  block_h: int = 64
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 2
  value_split: int = 1
  prefetch_idx: bool = False

  def __post_init__(self):
    _check_pow2(self, ("block_h", "block_k"))
    if self.value_split < 1 or self.value_split & (self.value_split - 1):
      raise ValueError(f"value_split={self.value_split} must be a power of 2")


@dataclasses.dataclass(frozen=True)
class BwdBlockSizes:
  """block_k: slots per chunk; col_block: columns per dkv atomic tile (bounds live registers).

  relaxed_atomics: dkv atomics with relaxed memory semantics (Pallas' own are acq_rel, which
  orders every atomic; the adds commute, so no ordering is needed).
  """

  block_h: int = 64
  block_k: int = 64  # 32 needs 316 KiB of SMEM (mma.sync operand copies for M=32); 64 fits
  col_block: int = 128
  num_warps: int = 8
  num_stages: int = 1
  relaxed_atomics: bool = False

  def __post_init__(self):
    _check_pow2(self, ("block_h", "block_k", "col_block"))


@dataclasses.dataclass(frozen=True)
class DkvBlockSizes:
  """dkv pass of the split backward. block_k: slots per chunk; col_block: dkv columns per program
  (q and dO column tiles stay resident); head_block: heads per dot (K of [dS;P]ᵀ·[q;dO])."""

  block_k: int = 64
  col_block: int = 128  # 256 with 2 stages needs 256 KiB of SMEM (Triton 3.6 + ptxas, S1)
  head_block: int = 128
  num_warps: int = 8
  num_stages: int = 2
  relaxed_atomics: bool = True

  def __post_init__(self):
    _check_pow2(self, ("block_k", "col_block", "head_block"))


def split_dims(k_dim: int, d_v: int) -> tuple[int, int]:
  """(da, db): da = next pow2 >= d_v (value dims first), db = pow2 covering the rest (or 0)."""
  da = 1 << max(4, (d_v - 1).bit_length())
  rest = k_dim - da
  db = 0 if rest <= 0 else 1 << max(4, (rest - 1).bit_length())
  return da, db


def _col_chunks(da, db, cw):
  """Static column chunks [(start, width)]: da split into widths <= cw, then the db part."""
  w = min(cw, da)
  chunks = [(c, w) for c in range(0, da, w)]
  if db:
    chunks.append((da, db))
  return chunks


def sparse_mla_fwd_triton(q, kv, idx, *, scale, da, db, bs: BlockSizes, interpret=False):
  """q [N,Hp,da+db], kv [R,da+db], idx [N,kp] -> out [N,Hp,da] (q.dtype), lse [N,Hp] f32."""
  n, hp, d = q.shape
  assert d == da + db and kv.shape[1] == d, (q.shape, kv.shape, da, db)
  kp = idx.shape[1]
  bh, bk = bs.block_h, bs.block_k
  assert hp % bh == 0 and kp % bk == 0, (hp, bh, kp, bk)
  n_chunks = kp // bk
  dtype = q.dtype
  qk_scale = scale * _LOG2E  # softmax in base 2
  vw = max(16, da // bs.value_split)
  chunks = [(c, vw) for c in range(0, da, vw)] + ([(da, db)] if db else [])
  n_v = da // vw

  def kernel(q_ref, kv_ref, idx_ref, o_ref, lse_ref):
    hb = pl.program_id(0)
    t = pl.program_id(1)
    heads = pl.ds(hb * bh, bh)
    qs = [q_ref[t, heads, pl.ds(c, w)] for c, w in chunks]
    chunk_ids = lambda j: idx_ref[t, pl.ds(j * bk, bk)]

    def body(j, carry):
      if bs.prefetch_idx:
        *carry, ids = carry
        next_ids = chunk_ids(jnp.minimum(j + 1, n_chunks - 1))
      else:
        ids = chunk_ids(j)
      accs, m_i, l_i = carry
      valid = ids >= 0
      rows = jnp.where(valid, ids, 0)
      ks, s = [], None
      for qc, (c, w) in zip(qs, chunks):  # gather [bk, w] row tiles (value dims first)
        ks.append(kv_ref[rows, pl.ds(c, w)])
        sc = pltriton.dot(qc, ks[-1], trans_b=True)
        s = sc if s is None else s + sc
      s = jnp.where(valid[None, :], s * qk_scale, -jnp.inf)
      m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing valid yet: keep exp finite
      alpha = jnp.exp2(m_i - m_use)
      p = jnp.exp2(s - m_use[:, None])
      l_i = l_i * alpha + jnp.sum(p, axis=1)
      accs = tuple(
        acc * alpha[:, None] + pltriton.dot(p.astype(dtype), kc) for acc, kc in zip(accs, ks)
      )
      carry = (accs, m_new, l_i)
      return (*carry, next_ids) if bs.prefetch_idx else carry

    init = (
      tuple(jnp.zeros((bh, vw), jnp.float32) for _ in range(n_v)),
      jnp.full((bh,), -jnp.inf, jnp.float32),
      jnp.zeros((bh,), jnp.float32),
    )
    if bs.prefetch_idx:
      init = (*init, chunk_ids(0))
    accs, m_i, l_i = jax.lax.fori_loop(0, n_chunks, body, init)[:3]
    has = l_i > 0
    l_safe = jnp.where(has, l_i, 1.0)
    inv = jnp.where(has, 1.0 / l_safe, 0.0)[:, None]
    for (c, w), acc in zip(chunks, accs):
      o_ref[t, heads, pl.ds(c, w)] = (acc * inv).astype(dtype)
    lse_ref[t, heads] = jnp.where(has, m_i * _LN2 + jnp.log(l_safe), jnp.inf)

  return pl.pallas_call(
    kernel,
    out_shape=(
      jax.ShapeDtypeStruct((n, hp, da), dtype),
      jax.ShapeDtypeStruct((n, hp), jnp.float32),
    ),
    grid=(hp // bh, n),  # heads fastest: a token's programs run together and share rows in L2
    compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
    interpret=interpret,
    name="sparse_mla_fwd_triton",
  )(q, kv, idx)


# Relaxed-semantics atomic add: a copy of Pallas' atomic_rmw ADD (same abstract eval and discharge)
# whose Triton lowering passes MemSemantic.RELAXED instead of the hard-coded ACQUIRE_RELEASE.
_ADD = tt_primitives.AtomicOpType.ADD
_atomic_add_relaxed_p = jax_core.Primitive("atomic_add_relaxed")
_atomic_add_relaxed_p.def_effectful_abstract_eval(
  lambda *avals, args_tree: tt_primitives._atomic_abstract_eval(
    *avals, args_tree=args_tree, atomic_type=_ADD
  )
)
state_discharge.register_discharge_rule(_atomic_add_relaxed_p)(
  lambda ctx, *args, args_tree: tt_primitives._atomic_rmw_discharge_rule(
    ctx, *args, args_tree=args_tree, atomic_type=_ADD
  )
)


@tt_lowering.register_lowering(_atomic_add_relaxed_p)
def _atomic_add_relaxed_lowering(ctx, *args_flat, args_tree):
  block_info, *_ = ctx.block_infos
  ptr, indexers, val, mask = args_tree.unflatten(args_flat)
  *_, value_aval, _ = args_tree.unflatten(ctx.avals_in)
  (idx,) = indexers
  ptr = tt_lowering._compute_pointers_from_indices(ptr, block_info, idx)
  val = tt_lowering._ensure_ir_value(val, value_aval)
  assert mask is None
  op = tt_dialect.RMWOp.FADD
  return tt_lowering._atomic_rmw(op, ptr, val, semantic=tt_dialect.MemSemantic.RELAXED)


def _atomic_add_relaxed(ref, idx, val):
  ref, transforms = state_primitives.get_ref_and_transforms(ref, idx, "atomic_add_relaxed")
  args_flat, args_tree = jax.tree.flatten((ref, transforms, val, None))
  return _atomic_add_relaxed_p.bind(*args_flat, args_tree=args_tree)


def _atomic_add_rows(ref, rows, col0, val, interpret, relaxed=False):
  """ref[rows[i], col0:col0+w] += val[i] for every i (rows may repeat)."""
  bk, w = val.shape
  if interpret:
    # The interpreter's atomic discharge rule keeps only one of repeated rows; programs run one
    # after another there, so a read-modify-write with a scatter-add is exact.
    cols = pl.ds(col0, w)
    ref[:, cols] = ref[:, cols].at[rows].add(val)
    return
  r2 = jax.lax.broadcast_in_dim(rows, (bk, w), (0,))
  c2 = col0 + jax.lax.broadcasted_iota(jnp.int32, (bk, w), 1)
  if relaxed:
    _atomic_add_relaxed(ref, (r2, c2), val)
  else:
    pltriton.atomic_add(ref, (r2, c2), val)


def _bwd_call(q, kv, idx, d_out, lse, delta, d_lse, *, scale, da, db, bs, interpret, write_dsp):
  """The head-block backward: dq plus either dkv atomics or the dS/P slots (write_dsp)."""
  n, hp, d = q.shape
  r = kv.shape[0]
  kp = idx.shape[1]
  bh, bk = bs.block_h, bs.block_k
  assert hp % bh == 0 and kp % bk == 0, (hp, bh, kp, bk)
  n_chunks = kp // bk
  dtype = q.dtype
  qk_scale = scale * _LOG2E
  chunks = _col_chunks(da, db, bs.col_block)
  v_chunks = [(c, w) for c, w in chunks if c < da]

  def kernel(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, dlse_ref, *refs):
    dq_ref, out_ref = refs[-2:]  # after the aliased dkv input in the atomics mode
    hb = pl.program_id(0)
    t = pl.program_id(1)
    heads = pl.ds(hb * bh, bh)
    qs = [q_ref[t, heads, pl.ds(c, w)] for c, w in chunks]
    dos = [do_ref[t, heads, pl.ds(c, w)] for c, w in v_chunks]
    lse2 = lse_ref[t, heads] * _LOG2E
    shift = dlse_ref[t, heads] - delta_ref[t, heads]

    def body(j, dqs):
      ids = idx_ref[t, pl.ds(j * bk, bk)]
      valid = ids >= 0
      rows = jnp.where(valid, ids, 0)
      ks = [kv_ref[rows, pl.ds(c, w)] for c, w in chunks]
      s = functools.reduce(
        lambda a, b: a + b, [pltriton.dot(qc, kc, trans_b=True) for qc, kc in zip(qs, ks)]
      )
      p = jnp.where(valid[None, :], jnp.exp2(s * qk_scale - lse2[:, None]), 0.0)
      dp = functools.reduce(
        lambda a, b: a + b, [pltriton.dot(dc, kc, trans_b=True) for dc, kc in zip(dos, ks)]
      )
      ds = (p * (dp + shift[:, None]) * scale).astype(dtype)  # scale folded in
      pb = p.astype(dtype)
      dqs = tuple(acc + pltriton.dot(ds, kc) for acc, kc in zip(dqs, ks))
      if write_dsp:
        slots = pl.ds(j * bk, bk)
        out_ref[t, 0, heads, slots] = ds
        out_ref[t, 1, heads, slots] = pb
        return dqs
      dst_rows = jnp.where(valid, ids, r)  # invalid slots -> dummy row r
      for i, (c, w) in enumerate(chunks):
        g = pltriton.dot(ds, qs[i], trans_a=True)  # [bk, w]
        if c < da:
          g += pltriton.dot(pb, dos[i], trans_a=True)
        _atomic_add_rows(out_ref, dst_rows, c, g, interpret, bs.relaxed_atomics)
      return dqs

    init = tuple(jnp.zeros((bh, w), jnp.float32) for _, w in chunks)
    dqs = jax.lax.fori_loop(0, n_chunks, body, init)
    for (c, w), acc in zip(chunks, dqs):
      dq_ref[t, heads, pl.ds(c, w)] = acc.astype(dtype)

  args = [q, kv, idx, d_out, lse, delta, d_lse]
  if write_dsp:
    out_shape = jax.ShapeDtypeStruct((n, 2, hp, kp), dtype)
    aliases, name = {}, "sparse_mla_bwd_dq_triton"
  else:
    args.append(jnp.zeros((r + 1, d), jnp.float32))
    out_shape = jax.ShapeDtypeStruct((r + 1, d), jnp.float32)
    aliases, name = {7: 1}, "sparse_mla_bwd_triton"
  return pl.pallas_call(
    kernel,
    out_shape=(jax.ShapeDtypeStruct((n, hp, d), dtype), out_shape),
    grid=(hp // bh, n),
    input_output_aliases=aliases,
    compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
    interpret=interpret,
    name=name,
  )(*args)


def sparse_mla_bwd_triton(
  q, kv, idx, d_out, lse, delta, d_lse, *, scale, da, db, bs: BwdBlockSizes, interpret=False
):
  """dq [N,Hp,D] (q.dtype), dkv [R,D] f32 from the saved lse (no softmax renormalisation).

  d_out [N,Hp,da] (zero beyond d_v), lse/delta/d_lse [N,Hp] f32 (d_lse zero where lse = inf).
  """
  args = (q, kv, idx, d_out, lse, delta, d_lse)
  kw = dict(scale=scale, da=da, db=db, bs=bs, interpret=interpret)
  dq, dkv = _bwd_call(*args, **kw, write_dsp=False)
  return dq, dkv[: kv.shape[0]]


def sparse_mla_bwd_dq_triton(
  q, kv, idx, d_out, lse, delta, d_lse, *, scale, da, db, bs: BwdBlockSizes, interpret=False
):
  """dq [N,Hp,D] and dsp [N,2,Hp,kp] (q.dtype): dsp[:,0] = scale·dS, dsp[:,1] = P, 0 at invalid
  slots; no atomics (dkv comes from sparse_mla_dkv_triton or an XLA scatter). Args as
  sparse_mla_bwd_triton."""
  args = (q, kv, idx, d_out, lse, delta, d_lse)
  return _bwd_call(*args, scale=scale, da=da, db=db, bs=bs, interpret=interpret, write_dsp=True)


def sparse_mla_dkv_triton(dsp, q, d_out, idx, *, r, da, db, bs: DkvBlockSizes, interpret=False):
  """dkv [R,da+db] f32: Σ over tokens t and slots j of dsp[t,0,:,j]ᵀ·q[t] + dsp[t,1,:,j]ᵀ·dO[t]
  (dO only on the first da columns), added at row idx[t,j] (idx < 0: dropped).

  One program = one token x one column tile, all heads reduced inside the dot, so every
  (slot, column) gets one atomic. Programs of a token run together (column tiles fastest) and
  share its dS/P tiles in L2.
  """
  n, _, hp, kp = dsp.shape
  d = q.shape[-1]
  assert d == da + db and d_out.shape[-1] == da and kp % bs.block_k == 0, (q.shape, d_out.shape)
  bk = bs.block_k
  hc = min(bs.head_block, hp & -hp)  # largest power of 2 dividing hp, capped
  head_tiles = [pl.ds(h0, hc) for h0 in range(0, hp, hc)]
  n_chunks = kp // bk

  def call(dkv, c0, cw, n_cols, with_p):
    def kernel(dsp_ref, q_ref, do_ref, idx_ref, _, dkv_ref):
      cb = pl.program_id(0)
      t = pl.program_id(1)
      col = c0 + cb * cw
      cols = pl.ds(col, cw)
      qs = [q_ref[t, h, cols] for h in head_tiles]
      dos = [do_ref[t, h, cols] for h in head_tiles] if with_p else []

      def body(j, carry):
        slots = pl.ds(j * bk, bk)
        ids = idx_ref[t, slots]
        g = None
        for i, h in enumerate(head_tiles):
          terms = [pltriton.dot(dsp_ref[t, 0, h, slots], qs[i], trans_a=True)]
          if with_p:
            terms.append(pltriton.dot(dsp_ref[t, 1, h, slots], dos[i], trans_a=True))
          for term in terms:
            g = term if g is None else g + term
        dst = jnp.where(ids >= 0, ids, r)  # invalid slots -> dummy row r
        _atomic_add_rows(dkv_ref, dst, col, g, interpret, bs.relaxed_atomics)
        return carry

      jax.lax.fori_loop(0, n_chunks, body, 0)

    return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((r + 1, d), jnp.float32),
      grid=(n_cols, n),
      input_output_aliases={4: 0},
      compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name="sparse_mla_dkv_triton",
    )(dsp, q, d_out, idx, dkv)

  dkv = jnp.zeros((r + 1, d), jnp.float32)
  cw = min(bs.col_block, da)
  dkv = call(dkv, 0, cw, da // cw, True)
  if db:
    dkv = call(dkv, da, db, 1, False)
  return dkv[:r]
