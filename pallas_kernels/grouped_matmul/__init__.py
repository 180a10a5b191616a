# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Grouped matmul (the MoE experts' GEMM): rows sorted by group, one weight matrix per group.

Public entry point: ops.gmm (impl="reference" | "pallas").
"""
