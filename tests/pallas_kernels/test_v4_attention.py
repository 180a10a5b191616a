# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""V4 sink attention on the sparse-attention kernels (pallas_kernels/v4_attention/ops.py).

- `fold_sink` over the sparse-MLA reference vs the V4 reference (f32, values and gradients);
- the index buffer's layout (window slots, then selected / every visible compressed entry);
- impl="pallas" with the GPU kernel set in the GPU interpreter vs the f32 reference, forward and
  jax.vjp gradients (q, rows, sink) with both cotangents, bf16;
- jax.export CUDA lowering at V4-Flash shapes, and the V4 attention layer with impl="pallas".
The f32 path (TPU kernels in the TPU interpreter) is in test_v4_attention_tpu.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels.sparse_mla import ops as sparse_mla_ops
from pallas_kernels.v4_attention import ops, reference

SCALE = 0.1
# Per-head sinks: ordinary, very large (the sink takes nearly all the mass), very negative (no
# effect), and values near the logits' lse.
SINKS = [0.0, 40.0, -60.0, 1.5, -1.0, 3.0, 0.5, -2.5]
f32 = lambda x: x.astype(jnp.float32)


def _awkward_idx(b, t, s, k, seed):
  """Ids in [-3, s+3) (invalid < 0 and >= s), row [0,0] all invalid, duplicates in the last row."""
  idx = jax.random.randint(jax.random.key(seed), (b, t, k), -3, s + 3, jnp.int32)
  idx = idx.at[0, 0].set(-1)
  return idx.at[-1, -1, : min(k, 6)].set(s // 2)


def _vjp_both(f, args, out_dtype, seed):
  """(out, lse), grads of f under cotangents on both outputs."""
  (o, l), vjp = jax.vjp(f, *args)
  do = _testing.normal(seed, o.shape, out_dtype)
  dl = jnp.where(jnp.isfinite(l), _testing.normal(seed + 1, l.shape), 0.0)
  return (o, l), vjp((do, dl)), (do, dl)


def _assert_close(got, ref, tol, what):
  err = _testing.rel_err(got, ref)
  assert err < tol, (what, err)
  return err


# ---------------------------------------------------------------------------------------------
# The epilogue alone (no kernel): exact up to f32 rounding.


def test_fold_sink_over_sparse_reference_matches_v4_reference():
  b, t, h, k_dim, s, k = 2, 5, 8, 16, 12, 20  # k > S: every row selected, with repeats
  q = _testing.normal(0, (b, t, h, k_dim))
  kv = _testing.normal(1, (b, s, k_dim))
  sink = jnp.asarray(SINKS, jnp.float32)
  idx = _awkward_idx(b, t, s, k, seed=2)

  def ours(q, kv, sink):
    out, lse = sparse_mla_ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=k_dim)
    return ops.fold_sink(out, lse, sink)

  ref = lambda q, kv, sink: reference.sink_attention(q, kv, idx, sink, scale=SCALE)

  @jax.jit
  def both(q, kv, sink):
    (o, l), g, cts = _vjp_both(ours, (q, kv, sink), jnp.float32, seed=3)
    (ro, rl), rvjp = jax.vjp(ref, q, kv, sink)
    # d sink of the empty row [0, 0] alone: all its mass is the sink's, so exactly 1 per head
    gs = jax.grad(lambda s: ours(q, kv, s)[1][0, 0].sum())(sink)
    return (o, l, g, gs), (ro, rl, rvjp(cts))

  (o, l, g, gs), (ro, rl, rg) = both(q, kv, sink)
  np.testing.assert_allclose(o, ro, atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(l, rl, atol=1e-6, rtol=1e-6)
  np.testing.assert_array_equal(o[0, 0], 0.0)  # no valid slot: out 0, lse = the sink
  np.testing.assert_allclose(l[0, 0], sink)
  for x, rx in zip(g, rg):
    assert np.isfinite(np.asarray(x)).all()
    np.testing.assert_allclose(x, rx, atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(gs, 1.0, rtol=1e-6)


def test_fold_sink_edge_values():
  """-inf sink: unchanged (lse +inf on empty rows, as the references); a row with no key and a
  finite sink: out 0, lse = a; finite gradients everywhere for finite sinks."""
  out = _testing.normal(0, (1, 2, 3, 4))
  lse = jnp.asarray([[[0.5, jnp.inf, 2.0], [jnp.inf, -1.0, 80.0]]], jnp.float32)
  fold = jax.jit(ops.fold_sink)
  o, l = fold(out.at[0, 0, 1].set(0).at[0, 1, 0].set(0), lse, jnp.full((3,), -jnp.inf))
  np.testing.assert_array_equal(l, lse)
  np.testing.assert_allclose(o, out.at[0, 0, 1].set(0).at[0, 1, 0].set(0), rtol=1e-6)
  sink = jnp.asarray([-1e4, 1e4, 0.0])
  o, l = fold(out, lse, sink)
  np.testing.assert_allclose(l, [[[0.5, 1e4, 2.0 + np.log1p(np.exp(-2.0))], [-1e4, 1e4, 80.0]]])
  np.testing.assert_array_equal(o[0, :, 1], 0.0)  # the huge sink takes all the mass
  np.testing.assert_allclose(o[0, 0, 0], out[0, 0, 0], rtol=1e-6)

  def loss(o, l, s):
    o, l = ops.fold_sink(o, l, s)
    return jnp.sum(o) + jnp.sum(jnp.where(jnp.isfinite(l), l, 0.0))

  for x in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(out, lse, sink):
    assert np.isfinite(np.asarray(x)).all()


# ---------------------------------------------------------------------------------------------
# The index buffer


def test_index_buffer_layout():
  t, w, m, u = 10, 3, 4, 2
  win = np.asarray(ops.v4_index_buffer(t, w))
  assert win.shape == (1, t, w)
  np.testing.assert_array_equal(win[0, 0], [-1, -1, 0])
  np.testing.assert_array_equal(win[0, 7], [5, 6, 7])
  dense = np.asarray(ops.v4_index_buffer(t, w, u=u, ratio=m, batch=2))
  assert dense.shape == (2, t, w + u)
  np.testing.assert_array_equal(dense[1, 2, w:], [-1, -1])  # (2+1)//4 = 0 entries visible
  np.testing.assert_array_equal(dense[1, 3, w:], [t, -1])  # entry 0 from t = 3
  np.testing.assert_array_equal(dense[0, 9, w:], [t, t + 1])
  sel = jnp.asarray([[[1, 0, 1, -1, 5]] * t])  # a duplicate, -1, an id >= U
  buf = np.asarray(ops.v4_index_buffer(t, w, u=u, ratio=m, idx=sel))
  assert buf.shape == (1, t, w + 5)
  np.testing.assert_array_equal(buf[0, 3, w:], [-1, t, -1, -1, -1])  # entry 1 not yet visible
  np.testing.assert_array_equal(buf[0, 8, w:], [t + 1, t, t + 1, -1, -1])
  # a window longer than T keeps only T slots (the rest would always be -1)
  assert ops.v4_index_buffer(4, 128).shape == (1, 4, 4)


# ---------------------------------------------------------------------------------------------
# The GPU kernel set in the GPU interpreter (bf16), against the f32 reference


def _check_pallas(f_pallas, f_ref, args, seed, tol):
  """Values and jax.vjp gradients (both cotangents) of impl="pallas" vs the f32 reference."""
  (o, l), g, (do, dl) = _vjp_both(f_pallas, args, args[0].dtype, seed)
  with jax.default_matmul_precision("highest"):
    (ro, rl), rvjp = jax.vjp(f_ref, *[f32(a) for a in args])
    rg = rvjp((f32(do), dl))
  assert o.shape == ro.shape and o.dtype == args[0].dtype and l.dtype == jnp.float32
  errs = {"out": _assert_close(o, ro, tol, "out")}
  np.testing.assert_array_equal(np.isinf(l), np.isinf(rl))
  fin = np.isfinite(rl)
  np.testing.assert_allclose(np.asarray(l)[fin], np.asarray(rl)[fin], atol=2e-3, rtol=2e-3)
  for name, x, rx, a in zip(("dq", "dkv", "dsink"), g, rg, args):
    assert x.shape == a.shape and x.dtype == a.dtype
    assert np.isfinite(np.asarray(x, np.float32)).all(), name
    errs[name] = _assert_close(x, rx, 2 * tol, name)
  return (o, l), errs


def test_sink_attention_pallas_gpu_interpret():
  # 60 slots -> 64 (ragged), k > S (every row, with repeats), ids < 0 and >= S, duplicates, a
  # row with no valid slot, heads padded 8 -> 64, K = V = 128, sinks large / very negative.
  b, t, h, k_dim, s, k = 2, 2, 8, 128, 40, 60
  q = _testing.normal(0, (b, t, h, k_dim), jnp.bfloat16)
  kv = _testing.normal(1, (b, s, k_dim), jnp.bfloat16)
  sink = jnp.asarray(SINKS, jnp.float32)
  idx = _awkward_idx(b, t, s, k, seed=2)
  fp = lambda q, kv, a: ops.sink_attention(
    q, kv, idx, a, scale=SCALE, impl="pallas", interpret=True
  )
  fr = lambda q, kv, a: ops.sink_attention(q, kv, idx, a, scale=SCALE)
  (o, l), errs = _check_pallas(fp, fr, (q, kv, sink), seed=3, tol=_testing.tolerances(jnp.bfloat16))
  print("sink_attention gpu interpret bf16 rel errs", errs)
  np.testing.assert_array_equal(np.asarray(o[0, 0], np.float32), 0.0)
  np.testing.assert_allclose(l[0, 0], sink)


def _v4_inputs(seed, b, t, u, h=8, k_dim=128):
  """bf16 q [B,T,H,K], raw rows kv [B,T,K], entries ckv [B,U,K] and the SINKS (H = 8)."""
  q = _testing.normal(seed, (b, t, h, k_dim), jnp.bfloat16)
  kv = _testing.normal(seed + 1, (b, t, k_dim), jnp.bfloat16)
  ckv = _testing.normal(seed + 2, (b, u, k_dim), jnp.bfloat16)
  return q, kv, ckv, jnp.asarray(SINKS, jnp.float32)


@pytest.mark.parametrize("mode", ["selected", "all_visible", "window_only"])
def test_v4_attention_pallas_gpu_interpret(mode):
  """window ∪ compressed through one index buffer (CSA sparse / HCA or CSA dense / window-only):
  T = 9 with m = 4 (a partial last block, queries 0-2 see no entry), selections with -1, ids not
  yet visible, duplicates, and k = 4 >= the 2 entries."""
  b, t, w, m = 1, 9, 3, 4
  u = t // m
  q, kv, ckv, sink = _v4_inputs(10, b, t, u)
  idx = jnp.asarray(np.random.default_rng(0).integers(-1, u + 1, (b, t, 4)), jnp.int32)
  idx = idx.at[:, -1].set(jnp.asarray([1, 1, 0, -1]))
  kw = dict(scale=SCALE, window=w, ratio=m if mode != "window_only" else 0)
  sel = idx if mode == "selected" else None

  def fp(q, kv, ckv, a):
    ckv = None if mode == "window_only" else ckv
    return ops.v4_attention(q, kv, a, ckv=ckv, idx=sel, impl="pallas", interpret=True, **kw)

  def fr(q, kv, ckv, a):
    ckv = None if mode == "window_only" else ckv
    return ops.v4_attention(q, kv, a, ckv=ckv, idx=sel, block_t=4, **kw)

  args = (q, kv, ckv, sink)
  (o, l), vjp = jax.vjp(fp, *args)
  (ro, rl), rvjp = jax.vjp(fr, *[f32(a) for a in args])
  tol = _testing.tolerances(jnp.bfloat16)
  errs = {"out": _assert_close(o, ro, tol, "out")}
  np.testing.assert_allclose(l, rl, atol=2e-3, rtol=2e-3)
  do, dl = _testing.normal(13, o.shape, jnp.bfloat16), _testing.normal(14, l.shape)
  names = ("dq", "dkv", "dckv", "dsink")
  for name, x, rx in zip(names, vjp((do, dl)), rvjp((f32(do), dl))):
    assert np.isfinite(np.asarray(x, np.float32)).all(), name
    if name == "dckv" and mode == "window_only":
      np.testing.assert_array_equal(np.asarray(x, np.float32), 0.0)
      continue
    errs[name] = _assert_close(x, rx, 2 * tol, name)
  print(f"v4_attention[{mode}] gpu interpret bf16 rel errs", errs)


def test_all_visible_blocks_equal_one_buffer(monkeypatch):
  """CSA's dense stage per query block (VISIBLE_BUFFER_LIMIT reached): the same out, lse and
  gradients as one whole index buffer, in the GPU interpreter; T = 9 in blocks of 4 (a ragged
  last block)."""
  b, t, w, m = 1, 9, 3, 4
  q, kv, ckv, sink = _v4_inputs(20, b, t, t // m)

  def f(q, kv, ckv, a):
    return ops.v4_attention(
      q, kv, a, scale=SCALE, window=w, ratio=m, ckv=ckv, block_t=4, impl="pallas", interpret=True
    )

  def run(limit):
    monkeypatch.setattr(ops, "VISIBLE_BUFFER_LIMIT", limit)
    (o, l), g, _ = _vjp_both(f, (q, kv, ckv, sink), jnp.bfloat16, seed=23)
    return (o, l, *g)

  blocks, whole = run(0), run(1 << 40)
  for x, y in zip(blocks[:2], whole[:2]):  # per query: the same kernel calls
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-6)
  # Gradients: each block's kernel backward rounds its part to bf16 and the blocks add up in f32,
  # so they differ from the one-call gradients by rounding; both stay within the bf16 bound of
  # the f32 reference.
  tol = _testing.tolerances(jnp.bfloat16)
  fr = lambda q, kv, ckv, a: ops.v4_attention(q, kv, a, scale=SCALE, window=w, ratio=m, ckv=ckv)
  with jax.default_matmul_precision("highest"):
    _, rvjp = jax.vjp(fr, f32(q), f32(kv), f32(ckv), sink)
    ref = rvjp(tuple(f32(c) for c in _vjp_both(f, (q, kv, ckv, sink), jnp.bfloat16, seed=23)[2]))
  for name, x, y, r in zip(("dq", "dkv", "dckv", "dsink"), blocks[2:], whole[2:], ref):
    assert x.dtype == y.dtype
    _assert_close(x, y, tol, name)
    _assert_close(x, r, 2 * tol, name)


def test_all_visible_blocks_keep_no_whole_buffer(monkeypatch):
  """The GPU path traced (no interpreter: the blocks under jax.checkpoint): the gradient's
  program holds one block's buffer [B, 4, W + U], never the whole [B, T, W + U] nor a stack of
  the blocks' buffers, and runs the forward kernel no more often than the one-buffer path
  (the backward does not replay it)."""
  b, t, h, k_dim, w, m = 1, 9, 8, 128, 3, 4
  sds = jax.ShapeDtypeStruct
  args = (
    sds((b, t, h, k_dim), jnp.bfloat16),
    sds((b, t, k_dim), jnp.bfloat16),
    sds((b, t // m, k_dim), jnp.bfloat16),
    sds((h,), jnp.float32),
  )

  def loss(q, kv, ckv, a):
    o, l = ops.v4_attention(
      q, kv, a, scale=SCALE, window=w, ratio=m, ckv=ckv, block_t=4, impl="pallas", backend="gpu"
    )
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(l), l, 0.0))

  def kernels(j):
    """Forward kernel calls (plgpu.kernel: primitive mpmd_map, named after the kernel function)
    in j and its sub-jaxprs."""
    n = 0
    for e in j.eqns:
      n += e.primitive.name == "mpmd_map" and e.params["name"] == "sparse_mla_fwd_kernel"
      for v in e.params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
          sub = getattr(x, "jaxpr", x)
          n += kernels(sub) if hasattr(sub, "eqns") else 0
    return n

  def grad_jaxpr(limit):
    monkeypatch.setattr(ops, "VISIBLE_BUFFER_LIMIT", limit)
    return jax.make_jaxpr(jax.grad(loss, (0, 1, 2, 3)))(*args).jaxpr

  whole, blocks = grad_jaxpr(1 << 40), grad_jaxpr(0)
  assert "i32[1,9,5]" in str(whole)  # the whole buffer [B, T, W + U]
  for shape in ("i32[1,9,5]", "i32[1,12,5]", "i32[3,1,4,5]"):
    assert shape not in str(blocks), shape
  assert "i32[1,4,5]" in str(blocks)
  # one forward kernel in the map's body; a backward replaying it would add a second
  assert kernels(blocks) == kernels(whole) == 1


def test_pallas_errors():
  q = jnp.zeros((1, 2, 8, 64), jnp.bfloat16)
  kv = jnp.zeros((1, 4, 64), jnp.bfloat16)
  idx = jnp.zeros((1, 2, 3), jnp.int32)
  with pytest.raises(ValueError, match="impl"):
    ops.sink_attention(q, kv, idx, jnp.zeros(8), scale=SCALE, impl="triton")
  with pytest.raises(ValueError, match="sink"):
    ops.sink_attention(q, kv, idx, jnp.zeros(4), scale=SCALE, impl="pallas")
  with pytest.raises(ValueError, match="bf16 or f16"):
    ops.sink_attention(f32(q), f32(kv), idx, jnp.zeros(8), scale=SCALE, impl="pallas")
  with pytest.raises(ValueError, match="raw rows"):
    ops.v4_attention(q, kv, jnp.zeros(8), scale=SCALE, window=2, impl="pallas")
  with pytest.raises(ValueError, match="ratio"):
    ops.v4_attention(q, kv[:, :2], jnp.zeros(8), scale=SCALE, window=2, ckv=kv, impl="pallas")


# ---------------------------------------------------------------------------------------------
# CUDA lowering at V4-Flash shapes (H = 64, K = V = 512, 128-row window + top-512 entries)


def _export(fn, *args):
  return jax.export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()


@pytest.mark.parametrize("h, topk", [(64, 512), (128, 1024)], ids=["flash", "pro"])
def test_cross_lowering_cuda_v4_flash_shapes(h, topk):
  """The real Mosaic GPU lowering of a CSA layer's attention (window 128 + top-k of T/4
  entries: 640 slots for Flash, 1152 for Pro's 128 heads and top-1024), forward and forward +
  backward with d sink (the backward's dkv by the Pallas-Triton segment sum)."""
  t, k_dim, w, m = 4096, 512, 128, 4
  sds = jax.ShapeDtypeStruct
  q, kv = sds((1, t, h, k_dim), jnp.bfloat16), sds((1, t, k_dim), jnp.bfloat16)
  ckv, idx = sds((1, t // m, k_dim), jnp.bfloat16), sds((1, t, topk), jnp.int32)
  sink = sds((h,), jnp.float32)
  fwd = functools.partial(ops.v4_attention, scale=k_dim**-0.5, window=w, ratio=m, impl="pallas")
  f = lambda q, kv, ckv, idx, a: fwd(q, kv, a, ckv=ckv, idx=idx)
  assert "mosaic_gpu" in _export(f, q, kv, ckv, idx, sink)

  def fwd_bwd(q, kv, ckv, idx, a):
    (o, l), vjp = jax.vjp(lambda q, kv, ckv, a: f(q, kv, ckv, idx, a), q, kv, ckv, a)
    return vjp((o, jnp.ones_like(l)))

  mlir = _testing.export_cuda(fwd_bwd, q, kv, ckv, idx, sink).mlir_module()
  assert "mosaic_gpu" in mlir and "segment_sum_rows" in mlir


def test_v4_layer_impl_pallas_lowers_to_the_kernel():
  """A V4 CSA layer with impl="pallas" (bf16) runs its attention on the kernel: the CUDA
  export of the layer's forward holds the Mosaic GPU call; impl="reference" does not."""
  from flax import nnx  # noqa: PLC0415

  from dsa_jax import v4  # noqa: PLC0415
  from dsa_jax.v4.attention import V4Attention  # noqa: PLC0415

  x = jax.ShapeDtypeStruct((1, 16, 64), jnp.bfloat16)
  mods = {}
  for impl in ("pallas", "reference"):
    cfg = v4.preset("v4_test", impl=impl, compute_dtype="bfloat16")
    layer = V4Attention(cfg, 4, rngs=nnx.Rngs(0))
    graph, state = nnx.split(layer)
    f = lambda state, x: nnx.merge(graph, state)(x, attention="sparse")[0]
    mods[impl] = _export(f, state, x)
  assert "mosaic_gpu" in mods["pallas"] and "mosaic_gpu" not in mods["reference"]


def test_v4_layer_impl_pallas_matches_reference_interpret(monkeypatch):
  """A V4 CSA layer (sparse stage, bf16) with impl="pallas", its kernel call in the GPU
  interpreter, gives the reference layer's output (both bf16; each is ~1.7e-2 from an f32 layer,
  the projections' rounding, and 6e-3 from the other)."""
  from flax import nnx  # noqa: PLC0415

  from dsa_jax import sparse_attention, v4  # noqa: PLC0415
  from dsa_jax.v4.attention import V4Attention  # noqa: PLC0415

  x = _testing.normal(20, (1, 12, 64), jnp.bfloat16)
  ys = {}
  for impl in ("pallas", "reference"):
    cfg = v4.preset("v4_test", impl=impl, compute_dtype="bfloat16")
    layer = V4Attention(cfg, 4, rngs=nnx.Rngs(0))
    layer.attn_sink[...] = jnp.linspace(-2.0, 2.0, cfg.n_heads)
    if impl == "pallas":
      monkeypatch.setattr(
        sparse_attention, "v4_attention", functools.partial(ops.v4_attention, interpret=True)
      )
    graph, state = nnx.split(layer)
    ys[impl], aux = jax.jit(lambda s, x: nnx.merge(graph, s)(x, attention="sparse"))(state, x)
    assert aux["topk_idx"].shape == (1, 12, cfg.index_topk)
  err = _assert_close(ys["pallas"], ys["reference"], _testing.tolerances(jnp.bfloat16), "y")
  print("V4 CSA layer impl=pallas (interpret) vs reference rel err", err)
