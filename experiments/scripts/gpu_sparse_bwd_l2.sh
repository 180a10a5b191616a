#!/bin/bash
# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
# Issues 17 and 18: the sparse phase's two backward changes on one H100/H200, two calls:
#   bash experiments/scripts/gpu_sparse_bwd_l2.sh parts   # ~6 min: tests, S3 sweep, E1 at 16K
#   bash experiments/scripts/gpu_sparse_bwd_l2.sh m1      # ~5 min: M1 v32_attn 32K
# parts: the -m gpu tests of both sparse-KL backwards (Triton, Mosaic GPU); the S3 backward
#   sweep with the dkv adds in column slabs (sparse_mla ops.GPU_BWD_SCATTER_SLAB_BYTES), XLA
#   and kernel; E1 at 16K with each sparse-KL backward, then with the 24 MiB slabs.
# m1: the dense row, then the sparse step for each sparse-KL backward (SPARSE_KL) x each
#   sparse-MLA backward (SPARSE_BWD), one process (one card, same compile cache).
# Results: $OUT/*.json; test and summary lines on stdout.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
case ${1:-parts} in
  parts)
    timeout 150 python3 -m pytest -m gpu -s -q tests/pallas_kernels/test_sparse_kl_kernel.py 2>&1 \
      | grep -E "rel err|ms:|passed|failed|Error" | tail -12
    timeout 200 python3 -m experiments.sweep_sparse_mla --budget_s=180 \
      --only=slab36,slab24,slab16,slab12,kernel,kernel_slab24,kernel_slab16 \
      --out="$OUT/sweep_sparse_mla_bwd_slab.json" 2>&1 | grep -E "^(default|slab|kernel|wrote)"
    for mode in kernels kernels_mosaic_bwd; do
      E1_PARTS=1 E1_LENGTHS=16384 E1_SPARSE_KL=$mode timeout 110 python3 -m experiments.bench \
        --suite=E1 --out="$OUT/e1_kl_${mode}.json" 2>&1 | grep -v "^[IW]1" | tail -1 | cut -c1-900
    done
    E1_PARTS=1 E1_LENGTHS=16384 E1_BWD_SLAB_MIB=24 timeout 110 python3 -m experiments.bench \
      --suite=E1 --out="$OUT/e1_slab24.json" 2>&1 | grep -v "^[IW]1" | tail -1 | cut -c1-900 ;;
  m1)
    M1_PRESETS=v32_attn M1_LENGTHS=32768 M1_PHASES=dense,sparse M1_ITERS=3 M1_LOSS_CHUNK=8192 \
      M1_REMAT_POLICY=save_attention M1_SPARSE_KL=${SPARSE_KL:-kernels,kernels_mosaic_bwd} \
      M1_SPARSE_BWD=${SPARSE_BWD:-xla,xla_slab24} timeout 560 python3 -m experiments.bench --suite=M1 \
      --out="$OUT/m1_bwd.json" 2>&1 | grep -v "^[IW]1" | cut -c1-600 ;;
esac
