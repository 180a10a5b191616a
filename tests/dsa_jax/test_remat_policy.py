# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""ModelConfig.remat_policy: "save_attention" keeps the kernels' forward outputs (_common.SAVED,
SAVED_OUT), so a remat block's backward does not run them again; "save_selection" keeps all but
the sparse attention outputs (the backward reruns that forward, not the top-k);
"save_projections" keeps what "save_attention" keeps and every projection's output (no matmul
replayed); gradients are those of "full"."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsa_jax
from dsa_jax import model, sparse_attention
from pallas_kernels.lightning_indexer import kernel_kl_triton
from pallas_kernels.lightning_indexer import ops as indexer_ops
from pallas_kernels.sparse_mla import ops


def _eqns(jaxpr):
  """Every equation of jaxpr and of its sub-jaxprs, in order."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def _pallas_calls(jaxpr, acc):
  """Names of every kernel call (pallas_call; mpmd_map: a Mosaic GPU kernel) in jaxpr and its
  sub-jaxprs, in order."""
  acc += [e.params["name"] for e in _eqns(jaxpr) if e.primitive.name in ("pallas_call", "mpmd_map")]
  return acc


def _grad_jaxpr(body, policy, *args):
  """jaxpr of the gradient of a scan over body (c, x) -> (c, y) under jax.checkpoint(policy)."""

  def loss(c):
    blk = jax.checkpoint(body, policy=sparse_attention.REMAT_POLICIES[policy])
    return jax.lax.scan(blk, c, args)[1].sum()

  return jax.make_jaxpr(jax.grad(loss))(1.0).jaxpr


@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["three_sweeps", "grad_in_forward"])
def test_saved_kernel_forward_runs_once(grad_in_forward, monkeypatch):
  """Dense-KL kernels in a remat'd scan (traced only): with "full" the backward runs the forward
  kernels again; with "save_attention" or "save_selection" each forward kernel appears once."""
  monkeypatch.setattr(kernel_kl_triton, "GRAD_IN_FORWARD", grad_in_forward)
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, w, aq, akv = f(2, 1, 32, 2, 16), f(1, 32, 16), f(2, 1, 32, 2), f(1, 32, 2, 16), f(1, 32, 16)
  bsz = kernel_kl_triton.BlockSizes(16, 16, 16)

  def body(c, xs):
    kl = kernel_kl_triton.dense_kl(xs[0] * c, k, xs[1], aq, akv, None, 0.3, bsz, True)
    return c, jnp.mean(kl)

  names = lambda policy: _pallas_calls(_grad_jaxpr(body, policy, q, w), [])
  full, saved, sel = names("full"), names("save_attention"), names("save_selection")
  fwd = ("dense_kl_indexer_lse", "dense_kl_fwd_dq") if grad_in_forward else ("dense_kl_fwd",)
  for n in fwd + ("dense_kl_attn_lse",):
    assert full.count(n) == 2 and saved.count(n) == sel.count(n) == 1, (n, full, saved, sel)
  assert saved.count("dense_kl_bwd_dk") == full.count("dense_kl_bwd_dk") == 1


def test_cudnn_dense_forward_runs_once(monkeypatch):
  """The dense phase's cuDNN attention, traced on CPU (jax's cuDNN rules with the version and
  device checks stubbed; nothing runs): under "save_attention" its forward appears once in the
  gradient of a remat'd scan whose layer also multiplies the output (as the output projection
  does), under "full" and "save_selection" again in the backward."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # noqa: PLC0415

  monkeypatch.setattr(cudnn_fa, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn_fa, "check_compute_capability", lambda c: True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  q = jax.random.normal(jax.random.key(0), (2, 1, 128, 4, 64), jnp.bfloat16)
  k, v, w = q[0] * 0.5, q[0, ..., :48], jnp.ones((4 * 48, 8), jnp.bfloat16)

  def body(c, xs):
    (qb,) = xs
    o, _ = sparse_attention.dense_attention(
      (qb * c).astype(qb.dtype), k, v, scale=0.2, block_t=16, impl="pallas", with_lse=False
    )
    return c, jnp.sum((o.reshape(1, 128, -1) @ w).astype(jnp.float32) ** 2)

  def forwards(policy):
    def loss(c):
      blk = jax.checkpoint(body, policy=sparse_attention.REMAT_POLICIES[policy])
      return jax.lax.scan(blk, c, (q,))[1].sum()

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(jnp.bfloat16(1.0)).jaxpr
    prims = [e.primitive.name for e in _eqns(jaxpr)]
    return sum("attention" in n and "fwd" in n for n in prims)

  runs = {p: forwards(p) for p in ("full", "save_attention", "save_selection")}
  assert runs == {"full": 2, "save_attention": 1, "save_selection": 2}, runs


@pytest.mark.parametrize(
  "backend,kernel", [("gpu", "sparse_mla_fwd_kernel"), ("tpu", "sparse_mla_fwd_tpu")]
)
def test_save_selection_reruns_the_attention_forward_only(backend, kernel):
  """The sparse attention kernels (traced only, nothing runs): "save_attention" runs the forward
  kernel once, "full" and "save_selection" again in the backward (the output is not kept)."""
  rng = np.random.default_rng(0)
  # 32 tokens: one TPU kernel call (a bare pallas_call, which jaxpr DCE never removes)
  q = jnp.asarray(rng.standard_normal((2, 1, 32, 64, 576)), jnp.bfloat16)
  kv = jnp.asarray(rng.standard_normal((1, 256, 576)), jnp.bfloat16)
  idx = jnp.asarray(rng.integers(0, 256, (2, 1, 32, 64)), jnp.int32)

  def body(c, xs):
    qb, ib = xs
    qb = (qb * c).astype(qb.dtype)
    out, lse = ops.sparse_mla(qb, kv, ib, impl="pallas", scale=0.04, d_v=512, backend=backend)
    return c, jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  runs = {
    p: _pallas_calls(_grad_jaxpr(body, p, q, idx), []).count(kernel)
    for p in ("full", "save_attention", "save_selection")
  }
  assert runs == {"full": 2, "save_attention": 1, "save_selection": 2}, runs


@pytest.mark.parametrize(
  "backend,kernel", [("gpu", "indexer_logits_kernel"), ("tpu", "indexer_logits_tpu_float8_e4m3fn")]
)
def test_kept_ids_are_not_selected_again(backend, kernel):
  """The fused indexer top-k (traced only): its ids are named SAVED, so under "save_attention" and
  "save_selection" the backward does not run the logits kernel again; under "full" it does."""
  rng = np.random.default_rng(0)
  iq = jnp.asarray(rng.standard_normal((2, 1, 256, 64, 128)), jnp.bfloat16)
  ik = jnp.asarray(rng.standard_normal((1, 256, 128)), jnp.bfloat16)
  iw = jnp.asarray(rng.standard_normal((1, 256, 64)), jnp.float32)

  def body(c, xs):
    q = (xs[0] * c).astype(xs[0].dtype)
    idx = indexer_ops.indexer_topk(q, ik, iw, topk=64, impl="pallas", backend=backend)
    idx = sparse_attention.saved(idx)
    return c, jnp.sum(jnp.take_along_axis(q[..., 0, 0], idx[..., 0], axis=1).astype(jnp.float32))

  runs = {
    p: _pallas_calls(_grad_jaxpr(body, p, iq), []).count(kernel)
    for p in ("full", "save_attention", "save_selection")
  }
  assert runs == {"full": 2, "save_attention": 1, "save_selection": 1}, runs


def test_save_selection_keeps_the_top_k():
  """The sparse phase of a remat'd model (traced only): the selection's top-k runs again in the
  backward under "full", not under "save_attention" nor "save_selection" (the ids are kept)."""
  counts = {}
  for policy in ("full", "save_attention", "save_selection"):
    cfg = dsa_jax.preset("test", remat=True, remat_policy=policy)
    graphdef, state = nnx.split(model.build(cfg, seed=0))
    tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, cfg.vocab_size)

    def loss(state):
      logits, aux = nnx.merge(graphdef, state)(tokens, attention="sparse", indexer_loss="sparse")
      return jnp.mean(aux["indexer_kl"]) - jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    jaxpr = jax.make_jaxpr(jax.grad(loss))(state).jaxpr
    counts[policy] = sum(e.primitive.name == "top_k" for e in _eqns(jaxpr))
  # one selection per scanned stack (dense and MoE layers) replayed under "full"
  assert counts["save_selection"] == counts["save_attention"] == counts["full"] - 2, counts


def _grads(policy, indexer_loss, attention, trainable, impl):
  cfg = dsa_jax.preset("test", remat=True, remat_policy=policy, impl=impl)
  graphdef, state = nnx.split(model.build(cfg, seed=0))
  tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, cfg.vocab_size)

  def loss(state):
    logits, aux = nnx.merge(graphdef, state)(tokens, attention=attention, indexer_loss=indexer_loss)
    kl = jnp.mean(aux["indexer_kl"])
    return kl if trainable == "indexer" else kl - jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  return jax.jit(jax.grad(loss))(state)


# warm-up: impl="pallas" on CPU is the streamed XLA dense KL (grad.py), whose residuals are named;
# sparse: the test preset's indexer is too small for the Pallas top-k, so the named values are the
# top-k ids and the KL target probabilities (mla.py)
@pytest.mark.parametrize(
  "indexer_loss,attention,trainable,impl",
  [
    ("dense", "dense", "indexer", "pallas"),
    pytest.param("sparse", "sparse", "all", "reference", marks=pytest.mark.slow),
  ],
  ids=["warmup", "sparse"],
)
def test_model_gradients_do_not_depend_on_policy(indexer_loss, attention, trainable, impl):
  full = _grads("full", indexer_loss, attention, trainable, impl)
  for policy in ("save_attention", "save_selection", "save_projections"):
    saved = _grads(policy, indexer_loss, attention, trainable, impl)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(saved)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def _replayed_projections(policy):
  """Linear products (einsum "...i,io->...o") in the backward's remat replay of the compiled CPU
  gradient of the test model (sparse phase, reference attention)."""
  cfg = dsa_jax.preset("test", remat=True, remat_policy=policy, impl="reference")
  graphdef, state = nnx.split(model.build(cfg, seed=0))
  tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, cfg.vocab_size)

  def loss(state):
    logits, aux = nnx.merge(graphdef, state)(tokens, attention="sparse", indexer_loss="sparse")
    return jnp.mean(aux["indexer_kl"]) - jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
  names = re.findall(r'= \S+ dot\(.*op_name="([^"]*)"', hlo)
  return sum("rematted_computation" in n and "...i,io->...o" in n for n in names)


def test_save_projections_replays_no_projection():
  """ "save_projections" keeps every Linear output, so the backward's replay has no projection
  product left; "save_attention" replays them."""
  assert _replayed_projections("save_attention") > 0
  assert _replayed_projections("save_projections") == 0


def test_unknown_policy_is_one_clear_error():
  with pytest.raises(ValueError, match="remat_policy.*save_attention"):
    dsa_jax.preset("test", remat_policy="dots")


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_gpu_compiled_step_runs_each_attention_forward_once(attention):
  """The compiled GPU gradient of a remat'd 2-layer scan under "save_attention": every attention
  forward custom call (cuDNN's for dense, the sparse-MLA kernel's for sparse) sits in the forward
  pass, none in the backward's replay, and none cloned into a fusion (XLA's dynamic-slice fusion
  did that to a kernel whose output is also written to the scan's stacked residuals)."""
  cfg = dsa_jax.preset(
    "v32_attn", vocab_size=1024, max_seq_len=4096, impl="pallas", remat_policy="save_attention"
  )
  tokens = jax.random.randint(jax.random.key(1), (1, 1024), 0, cfg.vocab_size)
  m = dsa_jax.build(cfg, seed=0)
  graphdef, state = nnx.split(m)
  kw = {"attention": attention, "indexer_loss": "sparse" if attention == "sparse" else "none"}

  def loss(st):
    logits, aux = nnx.merge(graphdef, st)(tokens, **kw)
    return jnp.mean(logits**2) + jnp.mean(aux.get("indexer_kl", 0.0))

  hlo = jax.jit(jax.value_and_grad(loss)).lower(state).compile().as_text()
  want = "sparse_mla_fwd_kernel" if attention == "sparse" else None
  comp, found = "", []
  for line in hlo.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      comp = line.split(" ")[0].lstrip("%")  # the computation a line belongs to
    if " custom-call(" not in line:
      continue
    target = re.search(r'custom_call_target="([^"]*)"', line).group(1)
    op = re.search(r'op_name="([^"]*)"', line)
    op = op.group(1) if op else ""
    if (want and want in op) or (not want and "cudnn" in target and "Backward" not in target):
      found.append((comp, op))
  assert found, "no attention forward custom call found"
  assert all("transpose(" not in op and "fusion" not in comp for comp, op in found), found
