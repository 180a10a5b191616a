# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Import direction: experiments -> dsa_jax -> pallas_kernels -> jax/numpy.

See docs/architecture.md §Layers.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules(path):
  """Every absolute module name `path` imports (function-level imports included)."""
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.module


def _imports(path):
  return (m.split(".")[0] for m in _modules(path))


def _files(pkg):
  return sorted((ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("pkg", ["dsa_jax", "pallas_kernels"])
def test_no_upward_imports(pkg):
  banned = {
    "dsa_jax": {"experiments", "tests"},
    "pallas_kernels": {"dsa_jax", "experiments", "tests", "flax"},
  }[pkg]
  bad = [(str(f.relative_to(ROOT)), m) for f in _files(pkg) for m in _imports(f) if m in banned]
  assert not bad, bad


def test_no_flags_in_the_library():
  bad = [
    str(f.relative_to(ROOT))
    for pkg in ("dsa_jax", "pallas_kernels")
    for f in _files(pkg)
    if {"absl", "ml_collections"} & set(_imports(f))
  ]
  assert not bad, bad


def test_kernels_enter_dsa_jax_through_the_dispatch_points():
  users = {
    str(f.relative_to(ROOT)) for f in _files("dsa_jax") if "pallas_kernels" in set(_imports(f))
  }
  dispatch = {
    "dsa_jax/indexer.py",
    "dsa_jax/sparse_attention.py",
    "dsa_jax/moe.py",  # grouped matmul of the routed experts
    "dsa_jax/expert_parallel.py",  # the same, inside its shard_map
  }
  assert users <= dispatch, users


@pytest.mark.parametrize("pkg", ["dsa_jax", "pallas_kernels"])
def test_no_jax_internals_in_product_code(pkg):
  """jax._src is JAX's private tree: a JAX upgrade may move it and break `import dsa_jax`."""
  bad = [
    (str(f.relative_to(ROOT)), m)
    for f in _files(pkg)
    for m in _modules(f)
    if m == "jax._src" or m.startswith("jax._src.")
  ]
  assert not bad, bad
