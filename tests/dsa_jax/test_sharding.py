# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Mesh equivalence on 8 fake CPU devices: loss and gradients of the sparse (DSA) phase on every
mesh layout equal the single-device run; checkpoints move between meshes.

One MoE layer at T=64 (top-k 16 < T, so the selection is really sparse) keeps each layout to one
compile of a small graph; heavier layouts are marked slow.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import dsa_jax
from dsa_jax import context_parallel, data, model, optim, sharding, train, train_checkpoint

SEQ = 64
MC = dsa_jax.preset("test", attn_block_q=SEQ // 2, n_layers=1, n_dense_layers=0, n_mtp_layers=0)


def _cfg(mesh, model_cfg=MC, phase="sparse", **kw):
  return train.TrainConfig(
    model=model_cfg,
    phase=train.phase(phase),
    optim=optim.OptimConfig(lr=1e-3, warmup_steps=1, total_steps=4),
    data=data.DataConfig(source="text", seq_len=SEQ, batch_size=8),
    ckpt=train.CkptConfig(async_save=False),
    steps=4,
    progress=False,
    mesh=tuple(mesh.items()),
    **kw,
  )


@functools.lru_cache(maxsize=None)
def _model(model_cfg=MC):
  return model.build(model_cfg, seed=0)


@functools.lru_cache(maxsize=None)
def _loss_and_grads(mesh_items, model_cfg=MC, rules=None, phase="sparse"):
  mesh = dict(mesh_items)
  devices = jax.devices()[:1] if mesh == {"data": 1} else None
  cfg = _cfg(mesh, model_cfg, phase=phase, rules=rules)
  tr = train.Trainer(cfg, mesh=sharding.make_mesh(mesh, devices))
  st = tr.init_state(_model(model_cfg))
  batch = tr.put_batch(data.batch(tr.cfg.data, 0))
  fn = jax.jit(
    jax.value_and_grad(tr._loss, has_aux=True),
    in_shardings=(tr.param_shardings, tr.rest_shardings, tr.batch_shardings),
  )
  (loss, (metrics, loads)), grads = fn(st.params, st.rest, batch)
  return jax.device_get((metrics, loads, nnx.to_pure_dict(grads)))


def _assert_equivalent(mesh, model_cfg=MC, rules=None, phase="sparse"):
  ref_m, ref_l, ref_g = _loss_and_grads((("data", 1),), model_cfg, phase=phase)
  m, l, g = _loss_and_grads(tuple(mesh.items()), model_cfg, rules, phase)
  for k in ref_m:
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-7, err_msg=k)
  np.testing.assert_array_equal(l["moe_load"], ref_l["moe_load"])
  flat, ref = nnx.traversals.flatten_mapping(g), nnx.traversals.flatten_mapping(ref_g)
  assert flat.keys() == ref.keys()
  for k in ref:  # fp32: reduction order differs between layouts
    scale = float(np.max(np.abs(ref[k]))) + 1e-12
    err = float(np.max(np.abs(flat[k] - ref[k])))
    assert err <= 1e-4 * scale + 1e-8, (mesh, "/".join(map(str, k)), err, scale)


LAYOUTS = [
  {"data": 8},
  {"fsdp": 8},
  {"tensor": 4, "data": 2},  # 4 heads
  {"expert": 8},
  {"sequence": 4, "data": 2},
  {"data": 2, "fsdp": 2, "tensor": 2},
]
SLOW_LAYOUTS = [
  {"expert": 4, "data": 2},
  {"sequence": 8},
  {"sequence": 2, "tensor": 2, "expert": 2},
  {"fsdp": 2, "expert": 2, "sequence": 2},
  {"data": 2, "tensor": 4},
]


@pytest.mark.parametrize("mesh", LAYOUTS, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_mesh_equivalence(mesh):
  _assert_equivalent(mesh)


@pytest.mark.slow
@pytest.mark.parametrize(
  "mesh", SLOW_LAYOUTS, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items())
)
def test_mesh_equivalence_more_layouts(mesh):
  _assert_equivalent(mesh)


@pytest.mark.parametrize(
  "mesh",
  [{"data": 8}, pytest.param({"tensor": 4, "data": 2}, marks=pytest.mark.slow)],
  ids=["data8", "tensor4xdata2"],
)
def test_warmup_mesh_equivalence(mesh, monkeypatch):
  """The warm-up with impl="pallas": on a batch-only mesh the attention and dense KL run per
  device in one shard_map (context_parallel.warmup_batch_parallel, where the GPU / TPU kernels
  run), with heads split the auto-partitioned path; both equal the single-device run."""
  taken = []
  orig = context_parallel.warmup_batch_parallel

  def spy(*a, **kw):
    out = orig(*a, **kw)
    taken.append(out is not None)
    return out

  monkeypatch.setattr(context_parallel, "warmup_batch_parallel", spy)
  _assert_equivalent(mesh, MC.replace(impl="pallas"), phase="warmup")
  assert taken == [mesh == {"data": 8}]  # traced once for the mesh run (the reference has none)


@pytest.mark.slow
def test_mesh_equivalence_dense_layer_and_capacity():
  # the dense-FFN stack, and a finite capacity large enough that nothing is dropped
  mc = MC.replace(n_layers=2, n_dense_layers=1, moe_capacity_factor=8.0)
  _assert_equivalent({"expert": 4, "sequence": 2}, mc)


def test_rules_are_config_overridable():
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  rules = sharding.rules_from((("embed", "tensor"), ("heads", None)))
  spec = sharding.spec_for(("embed", "heads"), (64, 96), mesh, rules)
  assert spec == jax.sharding.PartitionSpec("tensor", None)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.rules_from({"embed": "model"})
  # every parameter of every preset has one logical name per dim
  st = nnx.state(model.abstract(dsa_jax.preset("v32_671b")))
  for path, var in nnx.to_flat_state(st):
    axes = var.get_metadata().get("logical_axes")
    assert axes and all(a in sharding.DEFAULT_RULES for a in axes), path
    assert len(sharding._var_axes(var)) == var.get_value().ndim, path


def test_expert_parallel_drops_over_capacity():
  from dsa_jax import expert_parallel, moe

  mesh = sharding.make_mesh({"expert": 4, "data": 2})
  mc = MC.replace(moe_capacity_factor=0.5)
  layer = moe.MoE(mc, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 16, mc.dim))
  ctx = sharding.Context(mesh, sharding.DEFAULT_RULES)
  args = (layer.gate.kernel[...], layer.gate_bias[...], layer.w1[...], layer.w2[...])
  run = jax.jit(
    lambda x, f: expert_parallel.moe_routed(ctx, x, *args, layer.w3[...], moe.route, f),
    static_argnums=1,
  )
  y_cap, load, dropped = run(x, mc)
  y_all, load2, none = run(x, MC)
  assert float(none) == 0 and float(dropped) > 0
  np.testing.assert_array_equal(load, load2)  # load counts the routed copies before drops
  assert np.sum(load) == 8 * 16 * mc.n_activated_experts
  assert not np.allclose(y_cap, y_all)


def test_checkpoint_saved_on_one_mesh_restores_on_another(tmp_path):
  a = train.Trainer(_cfg({"fsdp": 4, "data": 2}))
  st = a.init_state(_model())
  st = st.replace(step=st.step + 3)  # (a train step would only add compile time here)
  mgr = train_checkpoint.manager(a, str(tmp_path))
  train_checkpoint.save(a, mgr, st, force=True)
  mgr.wait_until_finished()
  want = jax.device_get((a.full_params(st), st.opt_state))
  b = train.Trainer(_cfg({"tensor": 2, "expert": 4}))
  got, _ = train_checkpoint.restore(b, train_checkpoint.manager(b, str(tmp_path)), 3)
  assert int(got.step) == 3
  for x, s in zip(jax.tree.leaves(got), jax.tree.leaves(b.state_shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves((b.full_params(got), got.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_init_is_mesh_independent_and_sharded():
  mc = MC.replace(n_routed_experts=8)
  a = train.Trainer(_cfg({"fsdp": 2, "expert": 4}, mc))
  pa, ra = a.init_sharded()
  for x, s in zip(jax.tree.leaves(pa), jax.tree.leaves(a.param_shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
  w1 = pa["moe_layers"]["ffn"]["w1"][...]
  assert w1.addressable_shards[0].data.shape == (1, 8 // 4, MC.dim // 2, MC.moe_inter_dim)
  b = train.Trainer(_cfg({"data": 1}, mc), mesh=sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  pb, rb = b.init_sharded()
  for x, y in zip(jax.tree.leaves((pa, ra)), jax.tree.leaves((pb, rb))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  std = float(np.std(np.asarray(w1)))
  assert abs(std - MC.init_std) < 0.1 * MC.init_std
