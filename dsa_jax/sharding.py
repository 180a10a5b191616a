# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Logical-axis sharding: one rules table maps parameter/activation axis names to mesh axes.

Mesh axes: data, fsdp, tensor, expert, sequence. Every parameter carries `logical_axes` metadata;
`state_shardings` turns it into NamedShardings (an axis whose size the mesh axes do not divide stays
replicated, so every preset runs on every mesh). Activations go through `shard(x, names)`, which
reads the mesh and rules of the enclosing `use_mesh_rules` block (a no-op outside one), and the
explicit expert- and context-parallel code (expert_parallel.py, context_parallel.py) reads the same
context to build its shard_map specs. See docs/architecture.md §Scale-out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
  "batch": ("data", "fsdp", "expert"),
  "seq": "sequence",
  "layers": None,
  "vocab": "tensor",
  "embed": "fsdp",
  "embed2": "fsdp",
  "q_lora": None,
  "kv_lora": None,
  "kv_latent": None,
  "heads": "tensor",
  "index_heads": None,
  "index_heads_w": None,
  "index_dim": None,
  "mlp": "tensor",
  "experts": "expert",
  "experts_r": None,
  "norm": None,
  # DeepSeek-V4 (docs/v4.md §Sharding): output groups split like heads (a group is H/O heads)
  "o_groups": "tensor",
  "o_group_in": None,
  "o_lora": None,
  "compress_rows": None,
  "hc_mix": None,
  "hash": None,
  # activations (parameters never use these names)
  "act_embed": None,  # the model dim of [B,T,D] activations: replicated (no sequence-parallel D)
  "act_heads": "tensor",  # attention heads of [B,T,H,...] activations
}


def rules_from(overrides=None) -> dict:
  """DEFAULT_RULES with `overrides` ((name, mesh_axes) pairs or a dict) applied; checks names."""
  over = dict(overrides or ())
  for name, target in over.items():
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(f"sharding rule {name!r} -> {target!r}: unknown mesh axes {bad}")
  return {**DEFAULT_RULES, **over}


def make_mesh(shape: dict[str, int] | None = None, devices=None) -> Mesh:
  """A mesh with the five named axes; `shape` gives sizes (-1 once = the rest of the devices)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = dict(shape or {"data": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} unknown; expected a subset of {MESH_AXES}")
  sizes = [shape.get(a, 1) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}"
    )
  # jax.make_mesh orders the devices for the physical topology (TPU); elsewhere in list order.
  return jax.make_mesh(
    tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def spec_for(axes, shape, mesh: Mesh, rules=None) -> PartitionSpec:
  """PartitionSpec for a value with logical `axes`; non-dividing or reused mesh axes replicate."""
  rules = DEFAULT_RULES if rules is None else rules
  used: set[str] = set()
  out = []
  for name, dim in zip(axes, shape):
    target = rules.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    target = (target,) if isinstance(target, str) else tuple(target)
    target = tuple(a for a in target if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in target)
    if not target or dim % size:
      out.append(None)
      continue
    used.update(target)
    out.append(target[0] if len(target) == 1 else target)
  return PartitionSpec(*out)


def _var_axes(var) -> tuple:
  axes = tuple(var.get_metadata().get("logical_axes", ()))
  ndim = len(var.get_value().shape)
  if len(axes) == ndim - 1:  # stacked by nnx.vmap: leading layer axis
    axes = ("layers",) + axes
  if len(axes) != ndim:
    axes = (None,) * ndim
  return axes


def state_shardings(state: nnx.State, mesh: Mesh, rules=None):
  """NamedSharding for every leaf of an nnx.State, from its `logical_axes` metadata."""

  def one(var):
    axes = _var_axes(var)
    return var.replace(
      value=NamedSharding(mesh, spec_for(axes, var.get_value().shape, mesh, rules))
    )

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, shape, rules=None) -> NamedSharding:
  """Tokens [B, T, ...]: batch over data/fsdp/expert, sequence over `sequence` (where divisible)."""
  names = ("batch", "seq") + (None,) * (len(shape) - 2)
  return NamedSharding(mesh, spec_for(names, shape, mesh, rules))


def tree_shardings(tree, mesh: Mesh, rules=None):
  """Shardings for any pytree holding nnx.Variables (params, optimizer state): Variables by their
  `logical_axes`, every other array replicated (step counters, scalars)."""
  rep = NamedSharding(mesh, PartitionSpec())

  def one(x):
    if isinstance(x, nnx.Variable):
      axes = _var_axes(x)
      return x.replace(value=NamedSharding(mesh, spec_for(axes, x.get_value().shape, mesh, rules)))
    return rep

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ----------------------------------------------------------------------------------------------
# Activation context: the model reads the mesh and rules from here, so modules stay mesh-free.


@dataclasses.dataclass(frozen=True)
class Context:
  mesh: Mesh
  rules: dict

  def spec(self, names, shape) -> PartitionSpec:
    return spec_for(names, shape, self.mesh, self.rules)

  def axes(self, name: str, size: int) -> tuple[str, ...]:
    """Mesh axes a logical dim of `size` is split over here (() when replicated)."""
    s = self.spec((name,), (size,))[0]
    return () if s is None else (s,) if isinstance(s, str) else tuple(s)


_CTX: list[Context] = []


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules=None):
  """Within the block (at trace time), `shard` and the EP/CP paths use this mesh and rules."""
  _CTX.append(Context(mesh, DEFAULT_RULES if rules is None else rules))
  try:
    yield _CTX[-1]
  finally:
    _CTX.pop()


def current() -> Context | None:
  """The enclosing context when its mesh has more than one device, else None (single device)."""
  if not _CTX or _CTX[-1].mesh.size == 1:
    return None
  return _CTX[-1]


def shard(x, names):
  """Constrains activation x to the sharding of its logical `names` (no-op outside a context)."""
  ctx = current()
  if ctx is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, ctx.spec(names, x.shape)))
