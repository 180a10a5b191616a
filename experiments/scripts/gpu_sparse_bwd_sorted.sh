#!/bin/bash
# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
# Issues 17 and 18: do the sorted reductions (per-slot rows + a sort + the Pallas-Triton segment
# sum, no atomics) beat what runs now: for the sparse-MLA backward's dkv (sparse_mla
# ops.GPU_BWD_DKV="sorted", in the blocked XLA backward or with the kernel) and for the sparse
# indexer KL's dk (lightning_indexer ops.SPARSE_KL_DK="sorted" vs the Triton atomics)?
# One H100/H200, two calls:
#   bash experiments/scripts/gpu_sparse_bwd_sorted.sh parts   # ~7 min
#   bash experiments/scripts/gpu_sparse_bwd_sorted.sh m1      # ~4 min
# parts: the -m gpu tests of the kernel backward (both dkv schemes vs fp32; S3 errors) and of the
#   sparse KL (both dk schemes; prints their times); the S3 backward sweep (XLA, XLA sorted,
#   kernel with reds, kernel sorted; one process, same inputs); E1 at 16K as now and with the
#   sorted paths (one process each).
# m1: the M1 v32_attn sparse step at 32K after the dense row, one process: {Triton atomics,
#   sorted dk} x {XLA, XLA sorted, kernel sorted}.
# Results: $OUT/*.json; test and summary lines on stdout.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
case ${1:-parts} in
  parts)
    timeout 240 python3 -m pytest -m gpu -s -q tests/pallas_kernels/test_sparse_mla_bwd_mosaic.py \
      tests/pallas_kernels/test_sparse_kl_kernel.py 2>&1 \
      | grep -E "rel err|ms:|passed|failed|Error" | tail -12
    timeout 150 python3 -m experiments.sweep_sparse_mla --only=xla_sorted,kernel,kernel_sorted \
      --out="$OUT/sweep_sparse_mla_bwd_sorted.json" 2>&1 | grep -E "^(default|kernel|wrote)"
    for modes in "xla kernels" "xla_sorted kernels_sorted" "kernel_sorted kernels_sorted"; do
      set -- $modes
      E1_PARTS=1 E1_LENGTHS=16384 E1_SPARSE_BWD=$1 E1_SPARSE_KL=$2 timeout 110 python3 -m \
        experiments.bench --suite=E1 --out="$OUT/e1_$1_$2.json" 2>&1 | grep -v "^[IW]1" \
        | tail -1 | cut -c1-900
    done ;;
  m1)
    M1_PRESETS=v32_attn M1_LENGTHS=32768 M1_PHASES=dense,sparse M1_ITERS=3 M1_LOSS_CHUNK=8192 \
      M1_REMAT_POLICY=save_attention M1_SPARSE_KL=kernels,kernels_sorted \
      M1_SPARSE_BWD=xla,xla_sorted,kernel_sorted timeout 560 python3 -m experiments.bench --suite=M1 \
      --out="$OUT/m1_sorted.json" 2>&1 | grep -v "^[IW]1" | cut -c1-600 ;;
esac
