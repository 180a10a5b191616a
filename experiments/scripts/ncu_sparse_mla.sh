#!/bin/bash
# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
# Hardware counters of one sparse MLA forward launch beside one FlashMLA launch (Nsight Compute;
# GPU machines whose runtime gives ncu the counters), appended as a row to a results file:
#   bash experiments/scripts/ncu_sparse_mla.sh [S1|S2] [OUT_JSON]
# Clocks are left alone (--clock-control none). The CSVs stay next to the JSON; the second pass
# (ncu's sections, experiments/ncu_sparse_mla.py's SECTIONS) may fail without losing the row.
set -eu
SUITE=${1:-S2}
OUT_JSON=${2:-experiments/results/ncu_sparse_mla.json}
CSV=${OUT_JSON%.json}_${SUITE}.csv
SEC_CSV=${OUT_JSON%.json}_${SUITE}_sections.csv
metrics() { python3 -c "from experiments import ncu_sparse_mla as m; print(','.join(m.$1))"; }
profile() {  # profile OUT_CSV NCU_ARGS...
  local out=$1
  shift
  ncu --clock-control none --profile-from-start off --csv "$@" \
    python3 -m experiments.ncu_sparse_mla run --suite="$SUITE" > "$out"
}
profile "$CSV" --metrics "$(metrics METRICS)" || {
  echo "ncu_sparse_mla: retrying with the minimal metrics"
  profile "$CSV" --metrics "$(metrics MINIMAL)"
}
SECTIONS=$(python3 -c "from experiments import ncu_sparse_mla as m; print(*m.SECTIONS)")
# shellcheck disable=SC2046 (one --section flag per word)
profile "$SEC_CSV" $(printf -- '--section %s ' $SECTIONS) --metrics "$(metrics STALLS)" || {
  echo "ncu_sparse_mla: no sections"
  rm -f "$SEC_CSV"
}
python3 -m experiments.ncu_sparse_mla report --suite="$SUITE" --csv="$CSV" --out="$OUT_JSON" \
  --sections_csv="$SEC_CSV" \
  --command="bash experiments/scripts/ncu_sparse_mla.sh $SUITE $OUT_JSON"
