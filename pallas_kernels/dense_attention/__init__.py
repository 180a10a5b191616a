# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Causal dense attention kernels (the dense phase and the warm-up): TPU splash attention."""
