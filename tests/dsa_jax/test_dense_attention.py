# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The dense MHA path: cuDNN flash attention on GPU (impl="pallas", no lse needed) against the
chunked f32 reference. On CPU the cuDNN call is replaced by jax's XLA attention to check the
dispatch and the V padding; the `gpu` test runs the real kernel inside a dense-phase train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsa_jax
from dsa_jax import sparse_attention


def _qkv(seed, b=2, t=64, h=4, dk=48, dv=32, dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, h, dk), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, h, dk), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, dv), jnp.float32).astype(dtype)
  return q, k, v


def test_dispatch_pads_v_and_skips_lse(monkeypatch):
  calls = []
  real = jax.nn.dot_product_attention

  def stand_in(q, k, v, *, scale, is_causal, implementation):
    calls.append((v.shape, is_causal, implementation))
    return real(q, k, v, scale=scale, is_causal=is_causal, implementation="xla")

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  q, k, v = _qkv(0)
  out, lse = sparse_attention.dense_attention(
    q, k, v, scale=0.2, block_t=16, impl="pallas", with_lse=False
  )
  assert lse is None and calls == [((2, 64, 4, 48), True, "cudnn")]
  ref, ref_lse = sparse_attention.dense_attention(q, k, v, scale=0.2, block_t=16)
  assert out.shape == ref.shape == (2, 64, 4, 32)
  np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=2e-2, rtol=2e-2)
  # callers that need lse (warm-up KL, metrics) keep the chunked f32 path
  out2, lse2 = sparse_attention.dense_attention(
    q, k, v, scale=0.2, block_t=16, impl="pallas", with_lse=True
  )
  assert len(calls) == 1 and lse2.dtype == jnp.float32
  np.testing.assert_array_equal(np.float32(lse2), np.float32(ref_lse))

  # gradients of the cuDNN path in a remat'd scan, with either policy, equal the chunked path's
  def grads(impl, policy):
    def body(c, x):
      o, _ = sparse_attention.dense_attention(
        x * c, k, v, scale=0.2, block_t=16, impl=impl, with_lse=False
      )
      return c, jnp.sum(o.astype(jnp.float32) ** 2)

    def loss(c, xs):
      blk = jax.checkpoint(body, policy=sparse_attention.REMAT_POLICIES[policy])
      return jax.lax.scan(blk, c, xs)[1].sum()

    return jax.grad(loss, (0, 1))(jnp.bfloat16(1.0), jnp.stack([q, q]))

  want = grads("reference", "full")
  for policy in ("full", "save_attention"):
    for g, w in zip(grads("pallas", policy), want):
      np.testing.assert_allclose(np.float32(g), np.float32(w), atol=5e-2, rtol=5e-2)


def test_warmup_with_cudnn_attention_matches_reference(monkeypatch):
  """The warm-up (dense attention + dense KL) through the cuDNN dispatch: the attention returns
  no lse, the KL computes its own, and loss and indexer gradients match impl="reference"."""
  from flax import nnx

  real = jax.nn.dot_product_attention
  calls = []

  def stand_in(q, k, v, *, scale, is_causal, implementation):
    calls.append(implementation)
    return real(q, k, v, scale=scale, is_causal=is_causal, implementation="xla")

  cfg = dsa_jax.preset("test", compute_dtype="bfloat16", n_mtp_layers=0)
  tokens = jax.random.randint(jax.random.key(2), (2, 64), 0, cfg.vocab_size)

  def run(impl):
    m = dsa_jax.build(cfg.replace(impl=impl), seed=0)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(params):
      _, aux = nnx.merge(graphdef, params, rest)(tokens, attention="dense", indexer_loss="dense")
      return jnp.mean(aux["indexer_kl"])

    kl, g = jax.value_and_grad(loss)(params)
    return kl, nnx.to_pure_dict(g)

  want, want_g = run("reference")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  # the cuDNN dispatch, not the Mosaic GPU warm-up attention (which has no CPU interpreter path)
  monkeypatch.setattr(sparse_attention, "GPU_WARMUP_ATTENTION_KERNEL", False)
  got, got_g = run("pallas")
  assert calls and set(calls) == {"cudnn"}
  np.testing.assert_allclose(got, want, rtol=2e-2)
  flat, ref = nnx.traversals.flatten_mapping(got_g), nnx.traversals.flatten_mapping(want_g)
  idx_keys = [k for k in ref if "indexer" in k]
  assert idx_keys
  for k in idx_keys:
    err = np.linalg.norm(np.float32(flat[k]) - np.float32(ref[k]))
    assert err <= 5e-2 * (np.linalg.norm(np.float32(ref[k])) + 1e-6), k


@pytest.mark.gpu
def test_dense_phase_cudnn_matches_reference_on_gpu():
  cfg = dsa_jax.preset("1b", n_layers=2, vocab_size=1024, dim=256, n_heads=8, n_mtp_layers=0)
  tokens = jax.random.randint(jax.random.key(1), (1, 1024), 0, cfg.vocab_size)
  outs = {}
  for impl in ("reference", "pallas"):
    m = dsa_jax.build(cfg.replace(impl=impl), seed=0)
    logits, _ = m(tokens, attention="dense")
    outs[impl] = np.float32(logits)
  err = np.linalg.norm(outs["pallas"] - outs["reference"]) / np.linalg.norm(outs["reference"])
  assert err < 2e-2, err


@pytest.mark.gpu
def test_dense_phase_cudnn_gradients_under_both_remat_policies():
  """cuDNN in the dense phase: the gradients under remat with either policy equal each other and
  match the reference impl's."""
  cfg = dsa_jax.preset("1b", n_layers=2, vocab_size=1024, dim=256, n_heads=8, n_mtp_layers=0)
  tokens = jax.random.randint(jax.random.key(1), (1, 1024), 0, cfg.vocab_size)
  grads = {}
  for impl, policy in (("reference", "full"), ("pallas", "full"), ("pallas", "save_attention")):
    m = dsa_jax.build(cfg.replace(impl=impl, remat=True, remat_policy=policy), seed=0)
    graphdef, state = nnx.split(m)
    loss = lambda st: jnp.mean(nnx.merge(graphdef, st)(tokens, attention="dense")[0] ** 2)
    grads[impl, policy] = [np.float32(g) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(state))]
  flat = {k: np.concatenate([g.ravel() for g in v]) for k, v in grads.items()}
  rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  # cuDNN's backward may sum in a different order from run to run: not bitwise
  assert rel(flat["pallas", "save_attention"], flat["pallas", "full"]) < 1e-3
  assert rel(flat["pallas", "full"], flat["reference", "full"]) < 3e-2
