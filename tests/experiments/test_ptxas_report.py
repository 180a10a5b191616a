# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""ptxas_report.parse_ptxas on `ptxas -v` output (no CUDA plugin needed)."""

from experiments import ptxas_report

_BWD = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'sparse_mla_bwd_kernel_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for sparse_mla_bwd_kernel_mosaic_gpu_kernel
    432 bytes stack frame, 752 bytes spill stores, 748 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 432 bytes cumulative stack size, 1 bytes smem
ptxas info    : Compile time = 301.2 ms
"""

_FWD = """\
ptxas info    : Compiling entry function 'fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for helper
    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Function properties for fwd_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 145 registers, used 16 barriers, 1 bytes smem
"""


def test_parse_ptxas_spills():
  (r,) = ptxas_report.parse_ptxas(_BWD)
  assert r == {
    "function": "sparse_mla_bwd_kernel_mosaic_gpu_kernel",
    "registers": 168,
    "stack_frame": 432,
    "spill_stores": 752,
    "spill_loads": 748,
  }


def test_parse_ptxas_entries_take_their_own_properties():
  bwd, fwd = ptxas_report.parse_ptxas(_BWD + _FWD)
  assert bwd["spill_stores"] == 752 and bwd["registers"] == 168
  assert fwd == dict(
    function="fwd_kernel", registers=145, stack_frame=0, spill_stores=0, spill_loads=0
  )
