# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The Mosaic GPU sparse-MLA backward (kernel_mosaic_gpu_bwd.py, ops.GPU_BWD_KERNEL): in the GPU
interpreter on CPU vs autodiff of the reference and vs the blocked XLA backward (both cotangents
nonzero; ids < 0 and >= S, repeats inside a row and across tokens, a row with no valid slot);
the real Mosaic GPU lowering at the V3.2 shapes (SMEM budget, layouts, the inline PTX builders);
and `-m gpu` runs on a Hopper GPU (errors and times vs the XLA backward)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels.sparse_mla import (
  kernel_mosaic_gpu,
  kernel_mosaic_gpu_bwd,
  kernel_segment_sum_triton,
  ops,
  reference,
)

SCALE = 0.13


@pytest.fixture
def bwd_kernel(monkeypatch):
  """GPU_BWD_KERNEL on; bwd_kernel_why also passes on CPU (only for lowering to CUDA)."""
  monkeypatch.setattr(ops, "GPU_BWD_KERNEL", True)
  return monkeypatch


def _inputs(b, t, h, k_dim, s, k, dtype, seed=0, lo=-3, hi_extra=3):
  q = _testing.normal(seed, (b, t, h, k_dim), dtype)
  kv = _testing.normal(seed + 1, (b, s, k_dim), dtype)
  idx = jax.random.randint(jax.random.key(seed + 2), (b, t, k), lo, s + hi_extra, jnp.int32)
  idx = idx.at[0, 0].set(-1)  # a row with no valid slot
  idx = idx.at[-1, -1, : min(k, 5)].set(1)  # a repeat inside one row ...
  return q, kv, idx.at[0, -1, : min(k, 3)].set(1)  # ... and across tokens


def _check(b, t, h, k_dim, d_v, s, k, dtype, seed=0):
  """Kernel (interpreter) grads vs autodiff of the reference and vs the XLA backward."""
  q, kv, idx = _inputs(b, t, h, k_dim, s, k, dtype, seed=seed)
  tol = 2 * _testing.tolerances(dtype)

  def run(impl, kernel):
    ops.GPU_BWD_KERNEL = kernel
    f = lambda q, kv: ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=d_v, impl=impl, interpret=True)
    (o, l), vjp = jax.vjp(f, q, kv)
    do = _testing.normal(seed + 5, o.shape, dtype)
    dl = jnp.where(jnp.isfinite(l), _testing.normal(seed + 6, l.shape), 0.0)  # nonzero dlse
    return vjp((do, dl))

  grads = run("pallas", True)
  xla = run("pallas", False)
  ref = run("reference", False)
  for g, x, r in zip(grads, xla, ref):
    assert g.shape == r.shape and g.dtype == r.dtype
    assert np.isfinite(np.asarray(g, np.float32)).all()
    err, err_xla = _testing.rel_err(g, r), _testing.rel_err(x, r)
    assert err < tol, (err, err_xla)
    assert _testing.rel_err(g, x) < tol
  # Ids that no valid slot selects get exactly zero: the all-invalid row adds nothing.
  valid = (idx >= 0) & (idx < s)
  hit = np.zeros((b, s), bool)
  for bi in range(b):
    hit[bi, np.asarray(idx[bi])[np.asarray(valid[bi])]] = True
  assert (np.asarray(grads[1], np.float32)[~hit] == 0).all()
  assert (np.asarray(grads[0][0, 0], np.float32) == 0).all()  # the empty row's dq


def test_interpret_bf16(bwd_kernel):
  # H 48 (-> 64), k 72 (-> 2 chunks, the second half padding), k > S, Kp 192 = 3 column tiles
  # (one dq tile per warpgroup), d_v 80 (-> 128), B 2.
  _check(b=2, t=2, h=48, k_dim=192, d_v=80, s=40, k=72, dtype=jnp.bfloat16)


def test_interpret_bf16_sorted_dkv(bwd_kernel, monkeypatch):
  """GPU_BWD_DKV="sorted": the kernel stores its dR tiles, the slot ids are sorted and the
  Pallas-Triton segment sum adds them (token blocks of 2, so the scan runs two blocks and pads
  the last one). Same checks as the reds."""
  bwd_kernel.setattr(ops, "GPU_BWD_DKV", "sorted")
  monkeypatch.setattr(kernel_segment_sum_triton, "block_tokens", lambda *a: 2)
  _check(b=2, t=2, h=48, k_dim=192, d_v=80, s=40, k=72, dtype=jnp.bfloat16, seed=4)


def test_sorted_dkv_switch_checked(bwd_kernel):
  bwd_kernel.setattr(ops, "GPU_BWD_DKV", "red")
  q, kv, idx = _inputs(1, 2, 8, 64, 10, 8, jnp.bfloat16)
  f = lambda q, kv: ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=32, impl="pallas", interpret=True)
  _, vjp = jax.vjp(f, q, kv)
  with pytest.raises(ValueError, match="GPU_BWD_DKV='red'"):
    vjp((jnp.zeros((1, 2, 8, 32), jnp.bfloat16), jnp.zeros((1, 2, 8))))


@pytest.mark.slow  # ~25 s in the GPU interpreter; test_interpret_bf16 covers the path in CI
def test_interpret_f16_two_head_blocks(bwd_kernel):
  # 2 head blocks (grid over heads), k a multiple of 64, d_out = Kp (no rope-only tile).
  _check(b=1, t=3, h=128, k_dim=128, d_v=128, s=20, k=128, dtype=jnp.float16, seed=3)


@pytest.mark.slow
def test_interpret_v32_dims(bwd_kernel):
  # The V3.2 row: Kp 576 = 9 tiles (dq 3 + 3 + 3), d_out 512, 64 heads.
  _check(b=1, t=2, h=64, k_dim=576, d_v=512, s=50, k=128, dtype=jnp.bfloat16, seed=1)


def test_dispatch_and_errors(monkeypatch):
  monkeypatch.setattr(ops, "GPU_BWD_KERNEL", False)
  assert "GPU_BWD_KERNEL is off" in ops.bwd_kernel_why(interpret=True)
  monkeypatch.setattr(ops, "GPU_BWD_KERNEL", True)
  assert ops.bwd_kernel_why(interpret=True) is None
  if jax.default_backend() != "gpu":
    assert "no GPU" in ops.bwd_kernel_why()
  assert kernel_mosaic_gpu_bwd.tile_owners(9) == ((0, 1, 2), (3, 4, 5), (6, 7, 8))
  assert kernel_mosaic_gpu_bwd.tile_owners(2) == ((0,), (1,), ())
  x = jnp.zeros((2, 64, 128), jnp.bfloat16)
  lse = jnp.zeros((2, 64), jnp.float32)
  with pytest.raises(ValueError, match="bad kernel layout"):
    kernel_mosaic_gpu_bwd.sparse_mla_bwd(
      x, x[0], jnp.zeros((2, 64), jnp.int32), x[..., :64], lse, lse, scale=1.0
    )
  # V3.2: q, dO and R tiles + P, dS + ids/mbarriers fit the 227 KiB opt-in maximum.
  assert kernel_mosaic_gpu_bwd.smem_bytes(576, 512, 2) <= kernel_mosaic_gpu._SMEM_BYTES
  assert kernel_mosaic_gpu_bwd.smem_bytes(640, 512, 2) > kernel_mosaic_gpu._SMEM_BYTES


def test_red_schedule_lanes():
  """red_schedule simulated on 32 numpy lanes: every float of the warp's 16 x 64 slab is added
  once, at its own row and column, 4 adjacent floats per red, 16 rows per instruction with each
  row's columns one contiguous aligned run."""
  lane = np.arange(32)
  m, x = lane // 4, lane % 4
  # v[h][g]: the lane's pair at row m + 8h, columns 8g + 2x + {0, 1}; value = row * 64 + col
  v = [[np.stack([(m + 8 * h) * 64 + 8 * g + 2 * x + e for e in (0, 1)], 1) for g in range(8)]
       for h in range(2)]  # fmt: skip
  sched = kernel_mosaic_gpu_bwd.red_schedule(
    v,
    m,
    x,
    sel=lambda c, a, b: np.where(c[:, None], a, b),
    shfl=lambda a, k: a[lane ^ k],
    cond=lambda i: i != 0,
  )
  assert len(sched) == 8
  seen = np.zeros((16, 64), int)
  for row, col, pairs in sched:
    vals = np.concatenate(pairs, axis=1)  # [32 lanes, 4]
    row, col = np.broadcast_to(row, (32,)), np.broadcast_to(col, (32,))
    np.testing.assert_array_equal(vals, (row * 64 + col)[:, None] + np.arange(4))
    for r, c in zip(row, col):
      seen[r, c : c + 4] += 1
    assert len(set(row)) == 16
    for r in set(row):
      cols = np.sort(col[row == r])
      np.testing.assert_array_equal(np.diff(cols), 4)
      assert cols[0] % (4 * len(cols)) == 0
  np.testing.assert_array_equal(seen, 1)


@pytest.mark.parametrize("batch,dkv", [(1, "atomic"), (2, "atomic"), (1, "sorted")])
def test_cross_lowering_cuda_full_shape(bwd_kernel, batch, dkv, triton_verified):
  """The real Mosaic GPU lowering of forward + kernel backward at V3.2 shapes (SMEM budget,
  layout inference, the inline cp.async / red.global / st.global builders, the segment sum's
  Triton lowering); the interpreter misses these."""
  bwd_kernel.setattr(ops, "bwd_kernel_why", lambda interpret=False: None)
  bwd_kernel.setattr(ops, "GPU_BWD_DKV", dkv)
  t, s, h, k_dim, d_v, k = 4096 // batch, 32768 // batch, 128, 576, 512, 2048
  sds = jax.ShapeDtypeStruct
  q, kv = sds((batch, t, h, k_dim), jnp.bfloat16), sds((batch, s, k_dim), jnp.bfloat16)
  idx = sds((batch, t, k), jnp.int32)
  fwd = functools.partial(ops.sparse_mla, scale=SCALE, d_v=d_v, impl="pallas")

  def fwd_bwd(q, kv, idx, do, dl):
    (_, _), vjp = jax.vjp(lambda q, kv: fwd(q, kv, idx), q, kv)
    return vjp((do, dl))

  args = (q, kv, idx, sds((batch, t, h, d_v), jnp.bfloat16), sds((batch, t, h), jnp.float32))
  mlir = _testing.export_cuda(fwd_bwd, *args).mlir_module()
  if dkv == "atomic":
    assert "sparse_mla_bwd_kernel" in mlir
    assert "red.relaxed.gpu.global.add.v4.f32" in mlir
  else:
    assert "st.global.v2.b32" in mlir and "segment_sum_rows" in mlir
  assert triton_verified == ([True] if dkv == "sorted" else [])  # the segment sum's module


# ---------------------------------------------------------------------------------------------
# GPU


def _on_gpu():
  if jax.default_backend() != "gpu":
    pytest.skip("needs an NVIDIA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("dkv", ["atomic", "sorted"])
def test_gpu_small_shapes(bwd_kernel, dkv):
  """Awkward shapes on the GPU vs autodiff of the fp32 reference: H 20, k 72, d_v 80, B 2, a
  masked row, repeats, ids < 0 and >= S; dkv: ops.GPU_BWD_DKV."""
  _on_gpu()
  bwd_kernel.setattr(ops, "GPU_BWD_DKV", dkv)
  assert ops.bwd_kernel_why() is None  # the custom VJP takes the kernel here
  q, kv, idx = _inputs(2, 7, 20, 96, 50, 72, jnp.bfloat16, lo=-10)
  f = lambda q, kv: ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=80, impl="pallas")
  (o, l), vjp = jax.vjp(f, q, kv)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    rf = lambda q, kv: reference.sparse_mla_reference(q, kv, idx, scale=SCALE, d_v=80)
    (_, rl), rvjp = jax.vjp(rf, f32(q), f32(kv))
    do = _testing.normal(5, o.shape, jnp.bfloat16)
    dl = jnp.where(jnp.isfinite(rl), _testing.normal(6, l.shape), 0.0)
    rgrads = rvjp((f32(do), dl))
  for g, rg in zip(vjp((do, dl)), rgrads):
    assert _testing.rel_err(g, rg) < 2 * _testing.tolerances(jnp.bfloat16)


@pytest.mark.gpu
def test_gpu_s3_vs_xla(bwd_kernel):
  """S3 (T 4096, S 32768, H 128, k 2048, 576/512): the kernel and the XLA backward
  (ops._gpu_bwd_call, bf16 dkv rows) vs the XLA blocked backward in fp32 (times: S3_BWD in the
  S3 benchmark)."""
  _on_gpu()
  b, t, s, h, k_dim, d_v, k = 1, 4096, 32768, 128, 576, 512, 2048
  q, kv, idx = _inputs(b, t, h, k_dim, s, k, jnp.bfloat16, lo=-100, hi_extra=0)
  out, lse = ops.sparse_mla(q, kv, idx, scale=SCALE, d_v=d_v, impl="pallas")
  do = _testing.normal(5, out.shape, jnp.bfloat16)
  dl = jnp.where(jnp.isfinite(lse), _testing.normal(6, lse.shape, scale=0.1), 0.0)
  args = (q, kv, idx, out, lse, do, dl)
  config = ops.GpuConfig.default_for((k_dim, d_v, k))
  kern = jax.jit(lambda *a: ops._gpu_bwd_kernel_call(*a, SCALE, d_v, False))
  xla = jax.jit(lambda *a: ops._gpu_bwd_call(*a, SCALE, d_v, config))
  f32 = lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(lambda *a: ops._bwd_blocked(*map(f32, a), scale=SCALE, d_v=d_v, block_t=256))(
      *args
    )
  g_kern, g_xla = kern(*args), xla(*args)  # traced with GPU_BWD_DKV="atomic"
  bwd_kernel.setattr(ops, "GPU_BWD_DKV", "sorted")
  kern_sorted = jax.jit(lambda *a: ops._gpu_bwd_kernel_call(*a, SCALE, d_v, False))
  xla_sorted = jax.jit(lambda *a: ops._gpu_bwd_call(*a, SCALE, d_v, config))
  g_sorted, g_xla_sorted = kern_sorted(*args), xla_sorted(*args)
  grads = (("kernel", g_kern), ("xla", g_xla), ("kernel_sorted", g_sorted))
  grads += (("xla_sorted", g_xla_sorted),)
  errs = {name: [_testing.rel_err(x, r) for x, r in zip(g, ref)] for name, g in grads}
  print(f"S3 backward rel err vs fp32 (dq, dkv): {errs}")
  assert max(max(e) for e in errs.values()) <= 5e-3, errs
