#!/bin/bash
# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
# One H200 session's sweeps (kernel variants + a smoke of the reproduction pipeline), in the order
# given as arguments: repro_smoke sparse_mla sparse_kl indexer topk. Results land in $OUT (or
# /tmp/out). Any H100/H200:
#   bash experiments/scripts/h200_sweeps.sh sparse_kl sparse_mla
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
for what in "$@"; do
  echo "=== $what $(date +%T)"
  case $what in
    repro_smoke)
      timeout 300 python3 -m experiments.reproduce --config=experiments/configs/reproduce.py:size=h200 \
        --config.steps.pretrain=4 --config.steps.warmup=3 --config.steps.sparse=3 \
        --config.eval.per_distance=1 --config.eval.text_rows=1 \
        --workdir=/tmp/repro_smoke --stage=all --results="$OUT/repro_smoke" > "$OUT/repro_smoke.log" 2>&1
      echo "rc=$?"; grep -E "^\[|Error|error:" "$OUT/repro_smoke.log" | tail -30
      cp /tmp/repro_smoke/stage_*.json "$OUT/repro_smoke/" 2>/dev/null ;;
    sparse_mla) timeout 270 python3 -m experiments.sweep_sparse_mla --out="$OUT/sweep_sparse_mla.json" --budget_s=150 2>&1 | tail -45 ;;
    sparse_kl) timeout 240 python3 -m experiments.sweep_sparse_kl --out="$OUT/sweep_sparse_kl.json" --budget_s=150 2>&1 | tail -15 ;;
    indexer) timeout 240 python3 -m experiments.sweep_indexer --out="$OUT/sweep_indexer.json" --budget_s=150 2>&1 | tail -25 ;;
    topk) timeout 240 python3 -m experiments.sweep_topk --out="$OUT/sweep_topk.json" 2>&1 | tail -30 ;;
    *) echo "unknown: $what" ;;
  esac
done
echo "=== done $(date +%T)"
