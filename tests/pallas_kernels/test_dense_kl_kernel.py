# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Warm-up dense KL Pallas-Triton kernels (kernel_kl_triton.py): interpret mode vs the reference's
value and autodiff gradients at tiny shapes (ragged tiles, T < S, MHA / absorbed target, given
or computed attention lse), dispatch and errors of ops.dense_kl, cuda lowering at V3.2 shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._testing import export_cuda, rel_err
from pallas_kernels.lightning_indexer import grad, kernel_kl_triton, ops, reference

SCALE = 0.3


def _case(seed, b, t, s, j, d, h, c, mha, with_lse, dtype=jnp.float32):
  """Inputs made in numpy (eager jax ops would each compile: seconds on a loaded CPU)."""
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape, np.float32)
  q, k, aq, ct = f(b, t, j, d), f(b, s, d), f(b, t, h, c), f(b, t)
  w = f(b, t, j) * np.float32(30.0 / np.sqrt(j * d))  # a peaked indexer softmax
  akv = f(b, s, h, c) if mha else f(b, s, c)
  lse = None
  if with_lse:
    vis = np.arange(s)[None, :] <= (s - t + np.arange(t))[:, None]  # [t, s]
    eq = "bthc,bshc->bths" if mha else "bthc,bsc->bths"
    lg = np.where(vis[None, :, None, :], np.einsum(eq, aq, akv) * SCALE, -np.inf)
    m = lg.max(-1, keepdims=True)
    lse = jnp.asarray((m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[..., 0], jnp.float32)
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q), cast(k), cast(w), cast(aq), cast(akv), lse, jnp.asarray(ct)


def _check(args, bsz, tol=1e-5, uniform_ct=False):
  """Per-query KL and the vjp with a random cotangent (and, with uniform_ct, one equal on every
  row, as a mean loss gives), kernels (interpret) vs the reference."""
  q, k, w, aq, akv, lse, ct = args
  cts = (ct, jnp.full_like(ct, 0.37)) if uniform_ct else (ct,)

  @jax.jit
  def kern(q, k, w):
    f = lambda q, k, w: ops.dense_kl(
      q, k, w, aq, akv, lse, attn_scale=SCALE, impl="pallas", interpret=True, block_sizes=bsz
    )
    kl, vjp = jax.vjp(f, q, k, w)  # causal: dense_kl_fwd_grad's sweeps
    return kl, [vjp(c) for c in cts], f(q, k, w)  # undifferentiated: dense_kl_fwd

  @jax.jit
  def ref(q, k, w):
    f = lambda q, k, w: reference.dense_kl_reference(q, k, w, aq, akv, lse, attn_scale=SCALE)
    kl, vjp = jax.vjp(f, q, k, w)
    return kl, [vjp(c) for c in cts]

  got, got_gs, got_primal = kern(q, k, w)
  want, want_gs = ref(*(x.astype(jnp.float32) for x in (q, k, w)))
  assert rel_err(got, want) < tol
  assert rel_err(got_primal, want) < tol
  for i, (got_g, want_g) in enumerate(zip(got_gs, want_gs)):
    for name, g_, w_ in zip("qkw", got_g, want_g):
      assert g_.dtype == q.dtype
      assert rel_err(g_, w_) < tol, (i, name)


# (seed, B, T, S, J, D, H, C, mha, attn_lse given), BlockSizes(block_t, block_s, block_c)
CASES = {
  # T < S (offset 16), ragged last query and key blocks, per-head keys, lse given
  "mha_lse_offset": ((0, 2, 40, 56, 4, 16, 3, 12, True, True), (16, 16, 16)),
  # T = S, absorbed target, lse computed by the kernel; D 24 -> 32 and C 20 -> 32 (2 chunks)
  "absorbed_own_lse": ((1, 2, 48, 48, 5, 24, 3, 20, False, False), (32, 16, 16)),
  # per-head keys, lse computed; block_s > block_t
  "mha_own_lse": ((2, 2, 96, 96, 8, 32, 3, 24, True, False), (16, 32, 16)),
  # absorbed, lse given, B = 1, ragged S with T < S; C 72 -> 80 = 5 chunks (the looped path)
  "absorbed_lse_b1": ((3, 1, 72, 90, 6, 16, 2, 72, False, True), (32, 32, 16)),
}
SLOW_CASES = {
  # T much shorter than S: the dk kernel's first query block is past 0 for most key blocks
  "short_t": ((4, 2, 17, 60, 4, 16, 3, 12, True, True), (16, 16, 16)),
}


@pytest.fixture(params=[False, True], ids=["three_sweeps", "grad_in_forward"])
def grad_in_forward(request, monkeypatch):
  """Both causal differentiation paths: dense_kl_fwd + dq + dk, and dense_kl_fwd_grad + dk."""
  monkeypatch.setattr(kernel_kl_triton, "GRAD_IN_FORWARD", request.param)
  return request.param


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(name):
  """GRAD_IN_FORWARD (the default): the indexer-lse kernel and the dq sweep with the KL value and
  dk; its dk serves the uniform cotangent, the dk kernel the random one."""
  case, bsz = CASES[name]
  _check(_case(*case), kernel_kl_triton.BlockSizes(*bsz), uniform_ct=True)


@pytest.mark.parametrize("name", ["mha_lse_offset", "absorbed_own_lse"])
def test_interpret_three_sweeps_match_reference(name, monkeypatch):
  """GRAD_IN_FORWARD off: forward, dq and dk kernels (given lse with T < S, and the lse kernel's
  own)."""
  monkeypatch.setattr(kernel_kl_triton, "GRAD_IN_FORWARD", False)
  case, bsz = CASES[name]
  _check(_case(*case), kernel_kl_triton.BlockSizes(*bsz))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_interpret_matches_reference_more_shapes(name):
  case, bsz = SLOW_CASES[name]
  _check(_case(*case), kernel_kl_triton.BlockSizes(*bsz))


@pytest.mark.slow
def test_interpret_bf16_inputs(grad_in_forward):
  """bf16 operands: bf16 dots with f32 accumulation; g is cast to bf16 for dq / dk."""
  case = (5, 1, 48, 64, 4, 32, 2, 24, True, False)
  _check(_case(*case, dtype=jnp.bfloat16), kernel_kl_triton.BlockSizes(16, 16, 16), tol=2e-2)


def test_dispatch_and_errors():
  q, k, w, aq, akv, lse, _ = _case(0, 1, 8, 8, 2, 16, 2, 8, True, True)
  kw = dict(attn_scale=SCALE, impl="pallas")
  # CPU without interpret: the XLA custom_vjp of grad.py, no error
  jaxpr = str(jax.make_jaxpr(lambda *a: ops.dense_kl(*a, **kw))(q, k, w, aq, akv, lse))
  assert "custom_vjp_call" in jaxpr and "pallas_call" not in jaxpr
  jaxpr = str(
    jax.make_jaxpr(lambda *a: ops.dense_kl(*a, interpret=True, **kw))(q, k, w, aq, akv, lse)
  )
  assert "pallas_call" in jaxpr
  with pytest.raises(ValueError, match="backend='tpu'"):
    ops.dense_kl(q, k, w, aq, akv, lse, interpret=True, backend="tpu", **kw)
  with pytest.raises(ValueError, match="no GPU"):
    ops.dense_kl(q, k, w, aq, akv, lse, block_sizes=kernel_kl_triton.BlockSizes(), **kw)
  qd, kd = jnp.zeros((1, 8, 2, 300)), jnp.zeros((1, 8, 300))
  with pytest.raises(ValueError, match="D=300 > 256"):
    ops.dense_kl(qd, kd, w, aq, akv, lse, interpret=True, **kw)
  with pytest.raises(ValueError, match="power of 2"):
    kernel_kl_triton.BlockSizes(block_t=48)
  with pytest.raises(ValueError, match="in C"):
    ops.dense_kl(q, k, w, aq, akv[:, :, 0, :4], lse, **kw)


def _export_cuda(f, *avals):
  return export_cuda(f, *avals)


@pytest.mark.parametrize(
  "form,with_lse,dtype,grad_fwd",
  [
    ("mha", False, jnp.bfloat16, False),
    ("mha", True, jnp.float32, False),
    ("absorbed", True, jnp.bfloat16, False),
    ("mha", False, jnp.bfloat16, True),
  ],
)
def test_export_cuda_v32_shapes(form, with_lse, dtype, grad_fwd, monkeypatch):
  """Value and gradient lower for cuda at V3.2's shapes (J=64, D=128, H=128, C=192 per head or
  576 absorbed), L=4096: the lse kernel (when attn_lse is None), forward, dq/dw and dk kernels;
  or with GRAD_IN_FORWARD the indexer-lse kernel, the dq sweep that also sums the KL value and
  adds dk (dense_kl_fwd_grad), and the dk kernel for a cotangent not equal on every row: as many
  kernels."""
  monkeypatch.setattr(kernel_kl_triton, "GRAD_IN_FORWARD", grad_fwd)
  n, h = 4096, 128
  sds = jax.ShapeDtypeStruct
  c = 192 if form == "mha" else 576
  kv = sds((1, n, h, c) if form == "mha" else (1, n, c), dtype)

  def loss(q, k, w, aq, akv, lse):
    lse = lse if with_lse else None
    bsz = kernel_kl_triton.BlockSizes()
    return jnp.mean(kernel_kl_triton.dense_kl(q, k, w, aq, akv, lse, c**-0.5, bsz, False))

  args = (
    sds((1, n, 64, 128), dtype),
    sds((1, n, 128), dtype),
    sds((1, n, 64), dtype),
    sds((1, n, h, c), dtype),
    kv,
    sds((1, n, h), jnp.float32),
  )
  exp = _export_cuda(jax.value_and_grad(loss, (0, 1, 2)), *args)
  assert [a.shape for a in exp.out_avals] == [(), (1, n, 64, 128), (1, n, 128), (1, n, 64)]
  assert exp.mlir_module().count(pltriton.CUSTOM_CALL_TARGET_NAME) == 3 + (not with_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("block_s", [128])  # the default (sweep_dense_kl, lab log)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_gpu_matches_xla_path(dtype, tol, block_s, grad_in_forward):
  """Mid shape on the GPU: the kernels against the streamed XLA custom_vjp (grad.py, f32), with a
  random per-row cotangent and (a mean loss) a uniform one."""
  q, k, w, aq, akv, _, ct = _case(7, 1, 1024, 2048, 64, 128, 16, 192, True, False, dtype)
  for c in (ct, jnp.full_like(ct, 1.0 / ct.size)):
    _gpu_vs_xla(q, k, w, aq, akv, c, tol, block_s)


def _gpu_vs_xla(q, k, w, aq, akv, ct, tol, block_s):
  f32 = lambda x: x.astype(jnp.float32)

  def loss(fn):
    return lambda q, k, w: jnp.sum(ct * fn(q, k, w))

  bsz = kernel_kl_triton.BlockSizes(block_s=block_s)
  kern = lambda q, k, w: ops.dense_kl(
    q, k, w, aq, akv, None, attn_scale=SCALE, impl="pallas", block_sizes=bsz
  )
  aqf, akvf = f32(aq), f32(akv)
  xla = lambda q, k, w: grad.dense_kl(q, k, w, aqf, akvf, None, SCALE, 256, 2048)
  got, got_g = jax.jit(jax.value_and_grad(loss(kern), (0, 1, 2)))(q, k, w)
  with jax.default_matmul_precision("highest"):
    want, want_g = jax.jit(jax.value_and_grad(loss(xla), (0, 1, 2)))(f32(q), f32(k), f32(w))
  assert abs(float(got) - float(want)) <= tol * abs(float(want))
  for g_, w_ in zip(got_g, want_g):
    assert rel_err(g_, w_) < tol
