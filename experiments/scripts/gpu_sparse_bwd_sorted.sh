#!/bin/bash
# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
# Issues 17 and 18: does the kernel backward with the sorted dkv reduction (sparse_mla
# ops.GPU_BWD_DKV="sorted": stored dR tiles + sort + Pallas-Triton segment sum) beat the blocked
# XLA backward? One H100/H200 call, ~7 minutes:
#   bash experiments/scripts/gpu_sparse_bwd_sorted.sh
# 1. the -m gpu tests of the kernel backward (both dkv schemes vs fp32; S3 errors);
# 2. the S3 backward sweep: XLA, kernel with reds, kernel sorted (one process, same inputs);
# 3. M1 v32_attn sparse step at 32K with the XLA backward and the sorted kernel (one process).
# Results: $OUT/{sweep_sparse_mla_bwd_sorted,m1_bwd_sorted}.json; test lines on stdout.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
timeout 200 python3 -m pytest -m gpu -s -q tests/pallas_kernels/test_sparse_mla_bwd_mosaic.py \
  2>&1 | grep -E "rel err|passed|failed|Error" | tail -12
timeout 150 python3 -m experiments.sweep_sparse_mla --only=kernel,kernel_sorted \
  --out="$OUT/sweep_sparse_mla_bwd_sorted.json" 2>&1 | grep -E "^(default|kernel|wrote)"
M1_PRESETS=v32_attn M1_LENGTHS=32768 M1_PHASES=sparse M1_ITERS=3 M1_LOSS_CHUNK=8192 \
  M1_REMAT_POLICY=save_attention M1_SPARSE_BWD=xla,kernel_sorted timeout 220 python3 -m \
  experiments.bench --suite=M1 --out="$OUT/m1_bwd_sorted.json" 2>&1 | grep -v "^[IW]1" \
  | cut -c1-600
