# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Sparse-phase indexer KL Pallas-Triton kernels (kernel_sparse_kl_triton.py): interpret mode vs
reference.sparse_kl_reference (value and autodiff gradients of Σ dl·kl at tiny shapes: -1 and
>= S ids, repeated ids, rows with no valid slot or no target mass, k > S, a slot chunk with no
valid slot, padded J / D / k), the V4 sparse stage (v4_attention.ops.indexer_kl with idx), the
dispatch of ops.sparse_kl, cuda lowering at V3.2 and V4 shapes, and a -m gpu check at full size.

dk is summed from per-slot rows by a sort and the segment sum, token block by token block: the
CPU tests check the sums over repeated ids and over the tokens that share a key, also across
token blocks (block_tokens forced to 2, a padded last block).
There is no query tile (one program per token), so any T is "ragged"; k is padded to block_k.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton

from experiments import bench_common
from pallas_kernels import _testing
from pallas_kernels.lightning_indexer import grad, kernel_sparse_kl_triton, ops, reference
from pallas_kernels.sparse_mla import kernel_segment_sum_triton as seg
from pallas_kernels.v4_attention import ops as v4_ops

SMALL = kernel_sparse_kl_triton.BlockSizes(block_k=16)


def _case(seed, b, t, s, j, d, k, dtype=jnp.float32):
  """Inputs made in numpy: ids in [-1, S + 1] (-1 and >= S invalid) with forced repeats, row
  (0, 1) with no valid slot, row (0, 2) with valid slots but p = 0, the second slot chunk of row
  (b-1, 0) all invalid, and p > 0 on ~70% of the valid slots, normalised over them."""
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape, np.float32)
  q, kk, dl = f(b, t, j, d), f(b, s, d), f(b, t)
  w = f(b, t, j) * np.float32(3.0 / np.sqrt(j))
  idx = rng.integers(-1, s + 2, (b, t, k)).astype(np.int32)
  idx[..., 1::3] = idx[..., 0::3][..., : idx[..., 1::3].shape[-1]]  # a repeat in every triple
  idx[0, 1, :] = -1
  if k > 16:
    idx[b - 1, 0, 16:32] = -1
  valid = (idx >= 0) & (idx < s)
  p = np.where(valid & (rng.random((b, t, k)) < 0.7), rng.random((b, t, k)), 0).astype(np.float32)
  p[0, 2, :] = 0
  p /= np.maximum(p.sum(-1, keepdims=True), 1e-30)
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q), cast(kk), cast(w), jnp.asarray(idx), jnp.asarray(p), jnp.asarray(dl)


def _vg(fn, q, k, w, dl):
  kl, vjp = jax.vjp(fn, q, k, w)
  return kl, vjp(dl)


def _check(args, bsz, tol):
  q, k, w, idx, p, dl = args
  kern = jax.jit(
    lambda q, k, w: _vg(
      lambda q, k, w: ops.sparse_kl(
        q, k, w, idx, p, impl="pallas", interpret=True, block_sizes=bsz
      ),
      q,
      k,
      w,
      dl,
    )
  )
  ref = jax.jit(
    lambda q, k, w: _vg(lambda q, k, w: reference.sparse_kl_reference(q, k, w, idx, p), q, k, w, dl)
  )
  kl, grads = kern(q, k, w)
  rkl, rgrads = ref(*(x.astype(jnp.float32) for x in (q, k, w)))
  assert kl.dtype == jnp.float32 and kl.shape == q.shape[:2]
  assert _testing.rel_err(kl, rkl) < tol, _testing.rel_err(kl, rkl)
  for name, g, rg, x in zip("qkw", grads, rgrads, (q, k, w)):
    assert g.dtype == x.dtype and g.shape == x.shape, name
    assert _testing.rel_err(g, rg) < tol, (name, _testing.rel_err(g, rg))
  # no valid slot / no target mass: KL 0 and no gradient
  for row in (1, 2):
    assert float(kl[0, row]) == 0
    assert (np.asarray(grads[0][0, row], np.float32) == 0).all()
    assert (np.asarray(grads[2][0, row], np.float32) == 0).all()
  return kl, grads


# (seed, B, T, S, J, D, k), block_k
CASES = {
  # k > S (every key can be picked, several times), 2 chunks, J and D padded (4 -> 16, 24 -> 32)
  "k_over_s": ((0, 2, 5, 20, 4, 24, 32), 16),
  # k not a multiple of block_k (40 -> 48), S > k, odd T
  "padded_k": ((1, 1, 7, 64, 6, 16, 40), 16),
  # V3.2's J = 64 heads; block_k 32 (k 48 -> 64)
  "j64": ((2, 1, 3, 30, 64, 32, 48), 32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(name):
  """Rows with no valid slot and all-invalid chunks (branched around) are in every case."""
  case, bk = CASES[name]
  _check(_case(*case), kernel_sparse_kl_triton.BlockSizes(block_k=bk), 1e-5)


@pytest.mark.parametrize("name", ["k_over_s", "padded_k"])
def test_interpret_token_blocks_of_2(name, monkeypatch):
  """The backward's scan in token blocks of 2 (B·T 10 and 7, the latter with a padded last
  block; keys get rows from several blocks), against the same reference and tolerance."""
  monkeypatch.setattr(seg, "block_tokens", lambda *a: 2)
  case, bk = CASES[name]
  _check(_case(*case), kernel_sparse_kl_triton.BlockSizes(block_k=bk), 1e-5)


def test_interpret_bf16():
  """bf16 operands: bf16 dots with f32 accumulation; the g-weighted tiles are cast to bf16."""
  _check(_case(3, 2, 5, 20, 4, 32, 32, jnp.bfloat16), SMALL, 2e-2)


def test_interpret_repeated_ids_add_up():
  """Every slot of every row picks one of two keys: dk of those keys is the sum over all tokens
  and slots (the repeats within a token included), and every other key gets exactly 0."""
  q, k, w, idx, p, dl = _case(4, 1, 4, 12, 4, 16, 32)
  idx = jnp.where(jnp.arange(32) % 2 == 0, 3, 7)[None, None, :].repeat(4, axis=1).astype(jnp.int32)
  p = jnp.full(idx.shape, 1 / 32, jnp.float32)
  bsz = kernel_sparse_kl_triton.BlockSizes(block_k=16)
  f = lambda q, k, w: ops.sparse_kl(q, k, w, idx, p, impl="pallas", interpret=True, block_sizes=bsz)
  _, (dq, dk, dw) = jax.jit(lambda q, k, w: _vg(f, q, k, w, dl))(q, k, w)
  r = lambda q, k, w: reference.sparse_kl_reference(q, k, w, idx, p)
  _, (rdq, rdk, rdw) = jax.jit(lambda q, k, w: _vg(r, q, k, w, dl))(q, k, w)
  for g, rg in ((dq, rdq), (dk, rdk), (dw, rdw)):
    assert _testing.rel_err(g, rg) < 1e-5
  others = np.delete(np.asarray(dk[0]), [3, 7], axis=0)
  assert (others == 0).all() and np.abs(np.asarray(dk[0, [3, 7]])).min() > 0


def test_v4_sparse_stage_interpret():
  """V4's sparse stage (indexer_kl with idx) on the kernels: teacher from the layer's attention
  at the selected compressed entries (entries past (t+1)//m and -1 are off the support), against
  reference.v4_indexer_kl, value and gradients."""
  b, t, m, j, d, h, kd, k = 1, 24, 4, 4, 16, 2, 32, 8
  u = t // m
  rng = np.random.default_rng(5)
  iq = _testing.normal(0, (b, t, j, d))
  ik = _testing.normal(1, (b, u, d))
  iw = _testing.normal(2, (b, t, j), scale=j**-0.5)
  q = _testing.normal(3, (b, t, h, kd))
  ckv = _testing.normal(4, (b, u, kd))
  lse = jax.nn.softplus(_testing.normal(5, (b, t, h))) + 2.0
  idx = jnp.asarray(rng.integers(-1, u + 1, (b, t, k)), jnp.int32)
  dl = _testing.normal(6, (b, t))
  scale = kd**-0.5

  def vg(impl, **kw):
    f = lambda a, b_, c: v4_ops.indexer_kl(
      a, b_, c, q, ckv, lse, ratio=m, scale=scale, idx=idx, impl=impl, **kw
    )
    return jax.jit(lambda: _vg(f, iq, ik, iw, dl))()

  kl, grads = vg("pallas", interpret=True)
  rkl, rgrads = vg("reference")
  assert _testing.rel_err(kl, rkl) < 1e-5
  for g, rg in zip(grads, rgrads):
    assert _testing.rel_err(g, rg) < 1e-5
  assert (np.asarray(kl[:, : m - 1]) == 0).all()  # rows that see no entry
  jaxpr = str(
    jax.make_jaxpr(lambda *a: v4_ops.indexer_kl(*a, ratio=m, scale=scale, idx=idx, impl="pallas"))(
      iq, ik, iw, q, ckv, lse
    )
  )
  assert "pallas_call" not in jaxpr  # CPU without interpret: the reference
  jaxpr = str(
    jax.make_jaxpr(
      lambda *a: v4_ops.indexer_kl(*a, ratio=m, scale=scale, idx=idx, impl="pallas", interpret=True)
    )(iq, ik, iw, q, ckv, lse)
  )
  assert "pallas_call" in jaxpr


def test_dispatch_and_errors():
  q, k, w, idx, p, _ = _case(0, 1, 4, 8, 2, 16, 8)
  jaxpr = lambda **kw: str(
    jax.make_jaxpr(lambda *a: ops.sparse_kl(*a, impl="pallas", **kw))(q, k, w, idx, p)
  )
  # CPU without interpret: the XLA custom_vjp of grad.py, no error
  assert "custom_vjp_call" in jaxpr() and "pallas_call" not in jaxpr()
  assert "pallas_call" in jaxpr(interpret=True)
  assert not ops.SPARSE_KL_KERNELS_BY_DEFAULT or "pallas_call" in jaxpr(interpret=True)
  with pytest.raises(ValueError, match="no GPU"):
    ops.sparse_kl(q, k, w, idx, p, impl="pallas", block_sizes=SMALL)
  qd, kd = jnp.zeros((1, 4, 2, 300)), jnp.zeros((1, 8, 300))
  with pytest.raises(ValueError, match="D=300 > 256"):
    ops.sparse_kl(qd, kd, w, idx, p, impl="pallas", interpret=True)
  with pytest.raises(ValueError, match="power of 2"):
    kernel_sparse_kl_triton.BlockSizes(block_k=48)


@pytest.mark.parametrize("t,s,k", [(4096, 4096, 2048), (8192, 2048, 512)])
def test_export_cuda(t, s, k, triton_verified):
  """Value and gradient lower for cuda (forward and backward kernels and the segment sum,
  verified Triton modules) at V3.2's shapes (T = S = 4096, k 2048) and V4-Flash's sparse stage
  (T 8192 over U = T/4 compressed keys, k 512); J 64, D 128, bf16."""
  sds = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  bsz = kernel_sparse_kl_triton.BlockSizes()

  def loss(q, k_, w, idx, p):
    return jnp.mean(kernel_sparse_kl_triton.sparse_kl(q, k_, w, idx, p, bsz, False))

  args = (
    sds((1, t, 64, 128), bf),
    sds((1, s, 128), bf),
    sds((1, t, 64), bf),
    sds((1, t, k), jnp.int32),
    sds((1, t, k), jnp.float32),
  )
  exp = _testing.export_cuda(jax.value_and_grad(loss, (0, 1, 2)), *args)
  assert [a.shape for a in exp.out_avals] == [(), (1, t, 64, 128), (1, s, 128), (1, t, 64)]
  mlir = exp.mlir_module()
  assert mlir.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 3
  assert "segment_sum_rows" in mlir
  assert triton_verified == [True] * 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_gpu_matches_reference(dtype, tol):
  """V3.2 size on the GPU (T = S = 4096, k 2048, J 64, D 128; ~30% -1 ids, ~1/3 of the slots
  repeat another, a row with no valid slot): KL and gradients of Σ dl·kl against the f32
  reference; prints the kernels' and the XLA paths' fwd+bwd times (no assertion on them)."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs an NVIDIA GPU")
  b, t, s, j, d, k = 1, 4096, 4096, 64, 128, 2048
  rng = np.random.default_rng(11)
  q = _testing.normal(0, (b, t, j, d), dtype)
  kk = _testing.normal(1, (b, s, d), dtype)
  w = _testing.normal(2, (b, t, j), dtype, scale=3.0 / j**0.5)
  idx = rng.integers(0, s, (b, t, k)).astype(np.int32)
  idx[..., 1::3] = idx[..., 0::3][..., : idx[..., 1::3].shape[-1]]
  idx[rng.random(idx.shape) < 0.3] = -1
  idx[0, 5] = -1
  idx[0, 7, 64:] = -1  # mostly invalid: skipped chunks
  p = np.where((idx >= 0) & (rng.random(idx.shape) < 0.7), rng.random(idx.shape), 0)
  p = (p / np.maximum(p.sum(-1, keepdims=True), 1e-30)).astype(np.float32)
  idx, p = jnp.asarray(idx), jnp.asarray(p)
  dl = _testing.normal(3, (b, t))
  f32 = lambda x: x.astype(jnp.float32)

  def vg(fn):  # idx, p as arguments: closed-over arrays would become compile-time constants
    return jax.jit(
      lambda q, k_, w, idx, p: _vg(lambda q, k_, w: fn(q, k_, w, idx, p), q, k_, w, dl)
    )

  bsz = kernel_sparse_kl_triton.BlockSizes()
  kern = vg(lambda *a: ops.sparse_kl(*a, impl="pallas", block_sizes=bsz))
  xla = vg(lambda *a: grad.sparse_kl(*a, 512))
  kl, grads = kern(q, kk, w, idx, p)
  with jax.default_matmul_precision("highest"):
    ref = vg(lambda *a: reference.sparse_kl_reference(*a, block_t=256))
    rkl, rgrads = ref(f32(q), f32(kk), f32(w), idx, p)
  errs = [_testing.rel_err(kl, rkl)] + [_testing.rel_err(g, rg) for g, rg in zip(grads, rgrads)]
  print(f"\nsparse_kl {jnp.dtype(dtype).name} rel err kl/dq/dk/dw: {errs}")
  fq, fk, fw = f32(q), f32(kk), f32(w)
  print(
    f"fwd+bwd ms: kernels {bench_common.time_fn(kern, q, kk, w, idx, p):.2f}, XLA grad.sparse_kl "
    f"{bench_common.time_fn(xla, q, kk, w, idx, p):.2f}, reference autodiff "
    f"{bench_common.time_fn(ref, fq, fk, fw, idx, p):.2f}"
  )
  assert float(kl[0, 5]) == 0 and np.isfinite(np.asarray(kl)).all()
  for e in errs:
    assert e < tol, errs
