#!/bin/bash
# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
# The issue benchmarks with the current defaults, in one H200 call (FlashMLA wheel in .whl/):
#   bash experiments/scripts/h200_bench.sh      # E1 (128K first), then S1,S2,S3, then I1,T1
# Results: $OUT/{e1,sparse_mla,indexer}.json; copy them to experiments/results/.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# 128K first: it is the landing figure; the loop stops when a length would not fit the call.
E1_LENGTHS=${E1_LENGTHS:-131072,16384,65536,32768,8192} \
  timeout "${E1_TIMEOUT:-300}" python3 -m experiments.bench --suite=E1 --out="$OUT/e1.json" 2>&1 \
  | grep -v "^[IW]1" | tail -8
timeout "${S_TIMEOUT:-170}" python3 -m experiments.bench --suite=S1,S2,S3 \
  --out="$OUT/sparse_mla.json" 2>&1 | grep -v "^[IW]1" | tail -12
timeout "${I_TIMEOUT:-90}" python3 -m experiments.bench --suite=I1,T1 --out="$OUT/indexer.json" \
  2>&1 | grep -v "^[IW]1" | tail -6
