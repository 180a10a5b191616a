# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""8 fake CPU devices before any backend starts (2x4 meshes on CPU); float32 matmuls exact; one
XLA compilation cache for the whole run."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compilation is most of the CPU tests' time: LLVM's cheap pipeline (XLA's own HLO passes are
# unchanged, and fast math stays off) takes a third off the suite. CPU runs only: the GPU tests
# (JAX_PLATFORMS=cuda) keep the GPU backend's usual code generation.
if (
  os.environ["JAX_PLATFORMS"] == "cpu"
  and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]
):
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
  os.environ["XLA_FLAGS"] += " --xla_llvm_disable_expensive_passes=true"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

# Many tests build the same programs anew (a Trainer per test, the same preset and mesh): a
# compilation cache shared by the run's processes (the xdist workers inherit the controller's
# environment) compiles each one once; it cut test_train.py's wall time by a fifth on 2 cores.
# The directory lives for one run only (unless DSA_JAX_TEST_COMPILE_CACHE names one to keep), so
# no executable outlives the code it was built from.
if "DSA_JAX_TEST_COMPILE_CACHE" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="dsa_jax_test_xla_cache_")
  os.environ["DSA_JAX_TEST_COMPILE_CACHE"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ["DSA_JAX_TEST_COMPILE_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402


def _load_launcher(name: str):
  """experiments.<name>, imported afresh. Launchers define absl flags at import (several share
  --config / --workdir), so two of them in one test process would clash: the flags every
  experiments.* module defined so far are removed first, and the module is re-imported."""
  for module, defined in list(flags.FLAGS.flags_by_module_dict().items()):
    if module.startswith("experiments.") or module.startswith("experiments/"):
      for f in list(defined):  # delattr edits this list
        if f.name in flags.FLAGS:
          delattr(flags.FLAGS, f.name)
  sys.modules.pop(f"experiments.{name}", None)
  return importlib.import_module(f"experiments.{name}")


@pytest.fixture(scope="session")
def load_launcher():
  """load_launcher("train") -> the experiments.train module, its flags defined afresh."""
  return _load_launcher


@pytest.fixture
def triton_verified(monkeypatch):
  """A list that gets the MLIR verifier's result for every Pallas-Triton module lowered while the
  test runs (export serialises the modules unverified, so a malformed one would surface only in
  Triton's own compiler on a GPU). Private JAX hook: test code only."""
  from jax._src.pallas.triton import pallas_call_registration as reg  # noqa: PLC0415

  verified, lower = [], reg.lowering.lower_jaxpr_to_triton_module

  def lower_and_verify(*a, **kw):
    out = lower(*a, **kw)
    verified.append(out.module.operation.verify())
    return out

  monkeypatch.setattr(reg.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
  return verified
