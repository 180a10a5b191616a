# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Test helpers for kernels: tolerances by dtype, random inputs, relative error."""

import jax
import jax.numpy as jnp
import numpy as np

_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2, jnp.float16: 5e-3}


def tolerances(dtype) -> float:
  """Relative-error tolerance ||out-ref||/||ref|| for outputs computed in `dtype`."""
  return _TOL[jnp.dtype(dtype).type]


def rel_err(out, ref) -> float:
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def normal(seed: int, shape, dtype=jnp.float32, scale: float = 1.0):
  return (scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def export_cuda(f, *avals, device_kind: str = "NVIDIA H100"):
  """jax.export of jit(f) for cuda on CPU, under an abstract one-GPU mesh of `device_kind` (kernel
  choices that read the device see a Hopper GPU). Pallas-Triton custom calls are allowed."""
  from jax import export  # noqa: PLC0415
  from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415

  mesh = jax.sharding.AbstractMesh(
    (),
    (),
    abstract_device=jax.sharding.AbstractDevice(
      device_kind=device_kind, platform="gpu", num_cores=132
    ),
  )
  with jax.sharding.use_abstract_mesh(mesh):
    return export.export(
      jax.jit(f),
      platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)],
    )(*avals)


def record_smem_sizes(monkeypatch) -> list[int] | None:
  """The SMEM bytes Mosaic GPU asks for, one entry per kernel lowered after this call (its own
  sizing, `core._smem_tree_size`, wrapped through pytest's monkeypatch); None where this Mosaic
  GPU sizes SMEM elsewhere."""
  from jax.experimental.mosaic.gpu import core as mgpu_core  # noqa: PLC0415

  if not hasattr(mgpu_core, "_smem_tree_size"):
    return None
  sizes = []
  size = mgpu_core._smem_tree_size
  monkeypatch.setattr(mgpu_core, "_smem_tree_size", lambda b: sizes.append(size(b)) or sizes[-1])
  return sizes
