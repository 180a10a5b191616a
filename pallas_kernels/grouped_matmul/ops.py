# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Public grouped matmul (the MoE experts' GEMM) with the impl switch.

impl="reference": `jax.lax.ragged_dot`. impl="pallas": the Pallas-Triton kernels of
kernel_triton.py (forward, d_lhs and d_rhs; nothing [E,M,*]-sized) where they can run and are
wanted, else ragged_dot:
- they run on one GPU, or on CPU with interpret=True (tests);
- on one GPU they are the default (GMM_KERNELS_BY_DEFAULT; False keeps ragged_dot);
- with several devices a pallas_call is not auto-partitioned, so they run only inside a shard_map
  over every mesh axis (expert_parallel.py's body) or when asked for explicitly;
- asking for them explicitly (interpret=True or block_sizes) where they cannot run raises.
"""

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels.grouped_matmul import kernel_triton, reference

IMPLS = ("reference", "pallas")

# One GPU takes the Pallas-Triton grouped-matmul kernels by default: they pass the GPU tests
# (tests/pallas_kernels/test_grouped_matmul.py -m gpu, V3.2 expert shapes included), and XLA's
# GPU ragged_dot holds [E, M, N] (E-fold FLOPs and memory). M1_GMM=ragged_dot measures the other.
GMM_KERNELS_BY_DEFAULT = True


def _check(lhs, rhs, group_sizes):
  if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
    raise ValueError(
      f"expected lhs [M,K], rhs [E,K,N], group_sizes [E]; got {lhs.shape}, {rhs.shape}, "
      f"{group_sizes.shape}"
    )
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"lhs K={lhs.shape[1]} != rhs K={rhs.shape[1]}")
  if group_sizes.shape[0] != rhs.shape[0]:
    raise ValueError(f"group_sizes has {group_sizes.shape[0]} groups, rhs {rhs.shape[0]}")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes dtype {group_sizes.dtype} must be an integer type")


def _why_not(lhs, rhs, interpret, explicit) -> str | None:
  """None when the kernels run, else why not."""
  why = kernel_triton.supported(lhs, rhs)
  if why is None and not interpret and jax.default_backend() != "gpu":
    why = f"no GPU (jax.default_backend()={jax.default_backend()!r}); pass interpret=True"
  elif why is None and not explicit and not _common.per_device():
    why = "several devices outside a shard_map (a pallas_call is not auto-partitioned)"
  elif why is None and not explicit and not GMM_KERNELS_BY_DEFAULT:
    why = "GMM_KERNELS_BY_DEFAULT is off: opt in with block_sizes=BlockSizes()"
  return why


def gmm(
  lhs,
  rhs,
  group_sizes,
  *,
  preferred_element_type=None,
  impl: str = "reference",
  interpret: bool = False,
  block_sizes: kernel_triton.BlockSizes | None = None,
):
  """Grouped matmul, `jax.lax.ragged_dot`'s contract.

  Args:
    lhs: [M,K], rows sorted by group.
    rhs: [E,K,N], one matrix per group.
    group_sizes: [E] integer; group e owns the next group_sizes[e] rows. Rows past
      Σ group_sizes come out zero.
    preferred_element_type: output dtype (default: the operands' promoted dtype); the kernels
      accumulate in f32 either way.
    impl: "reference" (ragged_dot) | "pallas" (the kernels where they run, see the module doc).
    interpret: run the kernels in Pallas interpret mode (CPU tests).
    block_sizes: kernel_triton.BlockSizes; passing it asks for the kernels.
  Returns:
    [M,N] in preferred_element_type; differentiable in lhs and rhs.
  """
  _check(lhs, rhs, group_sizes)
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
  if impl == "pallas":
    explicit = bool(interpret) or block_sizes is not None
    why = _why_not(lhs, rhs, interpret, explicit)
    if why is None:
      dtype = jnp.result_type(lhs.dtype, rhs.dtype)
      out_dtype = jnp.dtype(preferred_element_type or dtype)
      return kernel_triton.gmm(
        lhs.astype(dtype),
        rhs.astype(dtype),
        group_sizes.astype(jnp.int32),
        out_dtype,
        block_sizes or kernel_triton.BlockSizes(),
        bool(interpret),
      )
    if explicit:
      raise ValueError(f"gmm kernels requested but not taken: {why}")
  return reference.gmm_reference(
    lhs, rhs, group_sizes, preferred_element_type=preferred_element_type
  )
