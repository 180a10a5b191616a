#!/bin/bash
# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
# The issue benchmarks with the current defaults, in one H200 call (FlashMLA wheel in .whl/):
#   bash experiments/scripts/h200_bench.sh            # S1,S2,S3 then I1,T1 then E1 8K..128K
# Results: $OUT/{sparse_mla,indexer,e1}.json; copy them to experiments/results/.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 200 python3 -m experiments.bench --suite=S1,S2,S3 --out="$OUT/sparse_mla.json" 2>&1 | grep -v "^[IW]1" | tail -12
timeout 120 python3 -m experiments.bench --suite=I1,T1 --out="$OUT/indexer.json" 2>&1 | grep -v "^[IW]1" | tail -6
E1_LENGTHS=${E1_LENGTHS:-8192,16384,32768,65536,131072} E1_MAX_S=400 \
  timeout 240 python3 -m experiments.bench --suite=E1 --out="$OUT/e1.json" 2>&1 | grep -v "^[IW]1" | tail -8
