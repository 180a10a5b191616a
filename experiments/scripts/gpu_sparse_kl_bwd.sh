#!/bin/bash
# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
# Issue 17: does the Mosaic GPU sparse-KL backward (kernel_sparse_kl_mosaic_gpu.py) beat the
# Triton one? One H100/H200 call, ~6 minutes:
#   bash experiments/scripts/gpu_sparse_kl_bwd.sh
# 1. the -m gpu tests of both backwards (correctness at V3.2 size; prints both times);
# 2. E1 at 16K with each backward (one process each: the layer and its parts);
# 3. M1 v32_attn sparse step at 32K with each (one process: same compile cache, same card).
# Results: $OUT/{e1_kl_kernels,e1_kl_kernels_mosaic_bwd,m1_kl}.json; test lines on stdout.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
timeout 300 python3 -m pytest -m gpu -s -q tests/pallas_kernels/test_sparse_kl_kernel.py 2>&1 \
  | grep -E "rel err|ms:|passed|failed|Error" | tail -12
for mode in kernels kernels_mosaic_bwd; do
  E1_PARTS=1 E1_LENGTHS=16384 E1_SPARSE_KL=$mode timeout 150 python3 -m experiments.bench \
    --suite=E1 --out="$OUT/e1_kl_${mode}.json" 2>&1 | grep -v "^[IW]1" | tail -2
done
M1_PRESETS=v32_attn M1_LENGTHS=32768 M1_PHASES=sparse M1_ITERS=3 M1_LOSS_CHUNK=8192 \
  M1_REMAT_POLICY=save_attention M1_SPARSE_KL=kernels,kernels_mosaic_bwd \
  timeout 300 python3 -m experiments.bench --suite=M1 --out="$OUT/m1_kl.json" 2>&1 \
  | grep -v "^[IW]1" | tail -4
