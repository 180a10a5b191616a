# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""V4's three training stages: the CSA indexer KL against a naive per-query loop, the gradient
wall in the model, and the phases run through the V3.2 trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsa_jax import data, optim
from dsa_jax import train as train_lib
from dsa_jax.v4 import config, model
from pallas_kernels.v4_attention import ops

B, T, H, K, J, D, M = 2, 29, 3, 8, 2, 4, 4
SCALE = K**-0.5
U = T // M
indexer_kl = jax.jit(ops.indexer_kl, static_argnames=("ratio", "scale", "block_t"))


def _inputs(seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  iq = jax.random.normal(ks[0], (B, T, J, D))
  ik = jax.random.normal(ks[1], (B, U, D))
  iw = jax.random.uniform(ks[2], (B, T, J), minval=0.1, maxval=1.0)
  q = jax.random.normal(ks[3], (B, T, H, K))
  ckv = jax.random.normal(ks[4], (B, U, K))
  # an lse larger than any logit's, as the joint softmax's (window and sink add mass)
  lse = jax.random.uniform(ks[5], (B, T, H), minval=3.0, maxval=4.0)
  return iq, ik, iw, q, ckv, lse


def _naive_kl(iq, ik, iw, q, ckv, lse, idx=None):
  iq, ik, iw, q, ckv, lse = (np.asarray(a, np.float64) for a in (iq, ik, iw, q, ckv, lse))
  out = np.zeros((B, T))
  for b in range(B):
    for t in range(T):
      n_vis = (t + 1) // M
      sup = list(range(n_vis)) if idx is None else [j for j in idx[b, t] if 0 <= j < n_vis]
      if not sup:
        continue
      c = SCALE * np.einsum("hk,jk->hj", q[b, t], ckv[b, sup])
      p = np.exp(c - lse[b, t][:, None]).sum(0)
      p /= p.sum()
      s = (iw[b, t][:, None] * np.maximum(iq[b, t] @ ik[b, sup].T, 0)).sum(0)
      logq = s - s.max() - np.log(np.exp(s - s.max()).sum())
      out[b, t] = np.sum(p * (np.log(p) - logq))
  return out


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_indexer_kl_matches_naive(mode):
  args = _inputs(1)
  idx = None
  if mode == "sparse":
    rng = np.random.default_rng(0)
    # ids past the visible range, -1, and entries not yet visible: all leave the support
    idx = rng.integers(-1, U + 2, (B, T, 3)).astype(np.int32)
    for row in idx.reshape(-1, 3):  # the indexer never selects an entry twice
      seen = set()
      for i, j in enumerate(row):
        row[i] = -1 if j in seen else j
        seen.add(int(j))
  got = indexer_kl(*args, ratio=M, scale=SCALE, idx=idx, block_t=8)
  want = _naive_kl(*args, idx=idx)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got)[:, : M - 1] == 0)  # nothing visible before position m-1


def test_indexer_kl_gradients_reach_only_the_indexer():
  """Finite gradients in iq/ik/iw (rows with an empty support included), zero in the teacher."""
  args = _inputs(2)
  ct = jax.random.normal(jax.random.key(3), (B, T))
  f = lambda *a: jnp.sum(ct * ops.indexer_kl(*a, ratio=M, scale=SCALE, block_t=8))
  grads = jax.grad(f, argnums=range(6))(*args)
  for g in grads[:3]:
    assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0
  for g in grads[3:]:
    assert float(jnp.max(jnp.abs(g))) == 0
  # the vjp in iw against central differences (the others enter through a ReLU)
  d = jax.random.normal(jax.random.key(4), iw_shape := args[2].shape)
  eps = 1e-3
  plus = f(*args[:2], args[2] + eps * d, *args[3:])
  minus = f(*args[:2], args[2] - eps * d, *args[3:])
  assert iw_shape == (B, T, J)
  np.testing.assert_allclose(
    float(jnp.sum(grads[2] * d)), float(plus - minus) / (2 * eps), rtol=2e-2
  )


def _small():
  # one window layer and one CSA layer, no MTP: the stages' code paths at the least compile time
  return config.preset("v4_test", n_layers=2, compress_ratios=(0, 4), n_mtp_layers=0)


def test_gradient_wall_in_the_model():
  """Sparse stage: the indexer KL moves only indexer parameters, the LM loss none of them."""
  cfg = _small()
  m = model.build(cfg)
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  tok = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 48)), jnp.int32)

  def losses(p):
    logits, aux = nnx.merge(graphdef, p, rest)(tok, attention="sparse", indexer_loss="sparse")
    lm = -jnp.mean(jax.nn.log_softmax(logits)[0, :-1][jnp.arange(47), tok[0, 1:]])
    return lm, jnp.sum(aux["indexer_kl"])

  grads = lambda p: (jax.grad(lambda p: losses(p)[0])(p), jax.grad(lambda p: losses(p)[1])(p))
  g_lm, g_kl = jax.jit(grads)(params)
  names = lambda g: {
    "/".join(map(str, path)): float(jnp.max(jnp.abs(x)))
    for path, x in jax.tree_util.tree_leaves_with_path(g)
  }
  lm, kl = names(g_lm), names(g_kl)
  assert any(v > 0 for n, v in kl.items() if "indexer" in n)
  assert all(v == 0 for n, v in kl.items() if "indexer" not in n)
  assert all(v == 0 for n, v in lm.items() if "indexer" in n)
  assert any(v > 0 for n, v in lm.items() if "indexer" not in n)


def test_remat_gives_the_same_loss_and_gradients():
  """remat (each block under jax.checkpoint, here with the "save_attention" policy; "full" takes
  the same path with no names saved): the sparse stage's loss and gradients equal the un-remat'd
  model's."""
  tok = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 48)), jnp.int32)

  def loss_and_grads(**kw):
    graphdef, params, rest = nnx.split(model.build(_small().replace(**kw)), nnx.Param, ...)

    def loss(p):
      logits, aux = nnx.merge(graphdef, p, rest)(tok, attention="sparse", indexer_loss="sparse")
      return jnp.mean(logits**2) + jnp.sum(aux["indexer_kl"])

    return jax.jit(jax.value_and_grad(loss))(params)

  want_l, want_g = loss_and_grads()
  got_l, got_g = loss_and_grads(remat=True, remat_policy="save_attention")
  np.testing.assert_allclose(float(got_l), float(want_l), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="remat_policy"):
    _small().replace(remat_policy="dots")


def test_modes_are_checked():
  m = model.build(_small())
  tok = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="needs attention='sparse'"):
    m(tok, attention="dense", indexer_loss="sparse")
  no_csa = model.build(config.preset("v4_test", compress_ratios=(0, 16, 0, 0), n_mtp_layers=1))
  with pytest.raises(ValueError, match="need a CSA layer"):
    no_csa(tok, indexer_loss="dense", attention="dense")


def _one_step_cfg(phase, **kw):
  return train_lib.TrainConfig(
    model=_small(),
    phase=train_lib.phase(phase),
    optim=optim.OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10),
    data=data.DataConfig(source="text", seq_len=64, batch_size=8),
    steps=1,
    progress=False,
    **kw,
  )


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["dense", "warmup", "sparse"])
def test_phases_run_in_the_trainer(phase):
  """One step of each stage: finite loss; the warm-up updates only indexer parameters."""
  cfg = _one_step_cfg(phase)
  tr = train_lib.Trainer(cfg)
  st = tr.init_state()
  before = {n: np.asarray(x) for n, x in jax.tree_util.tree_leaves_with_path(st.params)}
  names = ["/".join(map(str, p)) for p in before]
  st, m = tr.train_step(st, tr.put_batch(data.batch(cfg.data, 0)))
  assert np.isfinite(float(m["loss"]))
  if phase == "dense":
    assert not any("indexer" in n for n in names)
  if phase == "warmup":
    assert names and all("indexer" in n for n in names)
    assert float(m["indexer_kl"]) > 0
  if phase == "sparse":
    assert any("indexer" in n for n in names) and any("indexer" not in n for n in names)
  after = [np.asarray(x) for x in jax.tree.leaves(st.params)]
  assert any(not np.array_equal(a, b) for a, b in zip(before.values(), after))


def _mesh_loss_and_grads(mesh_axes, phase):
  from dsa_jax import sharding  # noqa: PLC0415

  cfg = _one_step_cfg(phase, mesh=tuple(mesh_axes.items()))
  devices = jax.devices()[:1] if mesh_axes == {"data": 1} else None
  tr = train_lib.Trainer(cfg, mesh=sharding.make_mesh(mesh_axes, devices))
  st = tr.init_state(model.build(_small(), seed=0))  # the same weights on every mesh
  batch = tr.put_batch(data.batch(cfg.data, 0))
  fn = jax.jit(
    jax.value_and_grad(tr._loss, has_aux=True),
    in_shardings=(tr.param_shardings, tr.rest_shardings, tr.batch_shardings),
  )
  (_, (metrics, _)), grads = fn(st.params, st.rest, batch)
  return jax.device_get((metrics, nnx.traversals.flatten_mapping(nnx.to_pure_dict(grads))))


@pytest.mark.slow  # ~40 s each; the V3.2 mesh suite (tests/dsa_jax/test_sharding.py) runs in CI
@pytest.mark.parametrize("phase", ["sparse", "warmup"])
def test_mesh_equivalence(phase):
  """V4 on 8 CPU devices (sequence 2 x fsdp 2 x tensor 2: tokens, weights and heads split):
  loss and gradients equal the single-device run (fp32; reduction order differs)."""
  if jax.device_count() < 8:
    pytest.skip("needs the 8 CPU devices of the test command")
  ref_m, ref_g = _mesh_loss_and_grads({"data": 1}, phase)
  m, g = _mesh_loss_and_grads({"sequence": 2, "fsdp": 2, "tensor": 2}, phase)
  for k in ("loss", "lm_loss", "indexer_kl"):
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert g.keys() == ref_g.keys()
  for k in ref_g:
    scale = float(np.max(np.abs(ref_g[k])))
    err = float(np.max(np.abs(g[k] - ref_g[k])))
    assert err <= 1e-4 * scale + 1e-8, ("/".join(map(str, k)), err, scale)
