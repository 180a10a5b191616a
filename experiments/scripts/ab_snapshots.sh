#!/bin/bash
# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
# A/B of code snapshots in one device call: `experiments.bench` suites in alternating processes,
# round by round, so every candidate is compared with a baseline measured beside it.
#   bash experiments/scripts/ab_snapshots.sh SUITES ROUNDS NAME=DIR[:VAR=VALUE[+VAR=VALUE]] ...
#   e.g. bash experiments/scripts/ab_snapshots.sh S3 2 main=.head bwdspill=.head2
#        bash experiments/scripts/ab_snapshots.sh E1 1 main=.head:E1_LENGTHS=16384 new=.head2:E1_LENGTHS=16384+E1_PARTS=1
# Each DIR is a checkout or a `git archive` snapshot; its COMMIT file (a short hash) names the
# rows' commit (else `git rev-parse`), and wheels (*.whl) in it are installed once into
# $SITE (not into the environment). Rows go to $OUT/ab_<suites>_<NAME>_r<round>.json; a summary
# line per process gives each row's suite, time and ratio. A process gets BENCH_TIMEOUT seconds
# (default 110); no process starts after AB_BUDGET_S seconds (default 520), so a 10-minute call
# returns what it measured. BENCH_FLAGS is added to every bench command (e.g. --small on CPU).
set -u
if [ $# -lt 3 ]; then
  sed -n '3,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
SUITES=$1
ROUNDS=$2
shift 2
OUT=${OUT:-/tmp/out}
SITE=${SITE:-/tmp/ab_site}
mkdir -p "$OUT" "$SITE"
export PYTHONUNBUFFERED=1
ROOT=$PWD
for spec in "$@"; do
  dir=${spec#*=}
  dir=${dir%%:*}
  if [ ! -d "$dir" ]; then
    echo "ab_snapshots: no directory '$dir' in '$spec' (expected NAME=DIR[:VAR=VALUE+...])"
    exit 2
  fi
  for w in "$dir"/*.whl; do
    [ -e "$w" ] && pip install -q --no-index --no-deps --target "$SITE" "$w" 2>&1 | grep -v WARN
  done
done
for ((r = 1; r <= ROUNDS; r++)); do
  for spec in "$@"; do
    if [ "$SECONDS" -gt "${AB_BUDGET_S:-520}" ]; then
      echo "ab_snapshots: budget of ${AB_BUDGET_S:-520} s spent before round $r of $spec"
      exit 0
    fi
    name=${spec%%=*}
    rest=${spec#*=}
    dir=${rest%%:*}
    vars=""
    [ "$rest" != "$dir" ] && vars=${rest#*:}
    out="$OUT/ab_${SUITES//,/_}_${name}_r${r}.json"
    commit=$(cat "$dir/COMMIT" 2>/dev/null || git -C "$dir" rev-parse --short HEAD 2>/dev/null)
    (
      cd "$dir" || exit 1
      IFS=+ read -ra kv <<< "$vars"
      for v in "${kv[@]}"; do export "${v?}"; done
      DSA_COMMIT=${commit:-unknown} PYTHONPATH=.:$SITE timeout "${BENCH_TIMEOUT:-110}" \
        python3 -m experiments.bench --suite="$SUITES" --out="$out" ${BENCH_FLAGS:-} 2>&1 \
        | grep -v -e '^[IW]1' -e '^{' | tail -3
    )
    python3 - "$out" "$name" "$r" "$vars" <<'EOF'
import json, os, sys
path, name, rnd, env = sys.argv[1:]
if not os.path.exists(path):
  print(f"{name} round {rnd}: no rows ({path} missing)")
  sys.exit(0)
for row in json.load(open(path))["results"]:
  base = row.get("baseline") or {}
  print(f"{name} round {rnd} {env}: {row['suite']} {row['time_ms']:.3f} ms, "
        f"{base.get('name')} {base.get('time_ms') or 0:.3f} ms, ratio {row.get('ratio') or 0:.3f}")
EOF
  done
done
cd "$ROOT" || exit 1
echo "ab_snapshots: done in $SECONDS s"
