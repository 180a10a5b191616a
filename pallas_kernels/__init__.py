# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Pallas kernels for DSA, each next to its pure-JAX reference. Public entry points: the ops modules.

Imports only jax and numpy (docs/architecture.md §Layers).
"""

from pallas_kernels.grouped_matmul import ops as grouped_matmul
from pallas_kernels.lightning_indexer import ops as lightning_indexer
from pallas_kernels.sparse_mla import ops as sparse_mla
from pallas_kernels.topk import ops as topk

__all__ = ["grouped_matmul", "lightning_indexer", "sparse_mla", "topk"]
