#!/bin/bash
# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
# Hardware counters of one sparse MLA forward launch beside one FlashMLA launch (Nsight Compute;
# GPU machines whose runtime gives ncu the counters), appended as a row to a results file:
#   bash experiments/scripts/ncu_sparse_mla.sh [S1|S2] [OUT_JSON]
# Clocks are left alone (--clock-control none). The CSV stays next to the JSON.
set -eu
SUITE=${1:-S2}
OUT_JSON=${2:-experiments/results/ncu_sparse_mla.json}
CSV=${OUT_JSON%.json}_${SUITE}.csv
metrics() { python3 -c "from experiments import ncu_sparse_mla as m; print(','.join(m.$1))"; }
run() {
  ncu --clock-control none --profile-from-start off --csv --metrics "$1" \
    python3 -m experiments.ncu_sparse_mla run --suite="$SUITE" > "$CSV"
}
run "$(metrics METRICS)" || { echo "ncu_sparse_mla: retrying with the minimal metrics"; run "$(metrics MINIMAL)"; }
python3 -m experiments.ncu_sparse_mla report --suite="$SUITE" --csv="$CSV" --out="$OUT_JSON" \
  --command="bash experiments/scripts/ncu_sparse_mla.sh $SUITE $OUT_JSON"
