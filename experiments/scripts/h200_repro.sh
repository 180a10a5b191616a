#!/bin/bash
# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
# The reproduction (all stages) then the E1 layer benchmark, on one H200, detached from the
# calling shell so it survives a 10-minute command limit; poll with `h200_repro.sh poll`.
#   bash experiments/scripts/h200_repro.sh start   # returns at once
#   bash experiments/scripts/h200_repro.sh poll    # waits up to POLL_S, then packs /tmp/run
set -u
RUN=/tmp/run
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
case ${1:-start} in
  start)
    mkdir -p $RUN
    setsid nohup bash -c "
      python3 -m experiments.reproduce --config=experiments/configs/reproduce.py:size=h200 \
        --workdir=$RUN/wd --stage=all --results=$RUN/results 2>&1 | grep -v '^[IW]1' > $RUN/repro.log
      echo repro_rc=\${PIPESTATUS[0]} >> $RUN/repro.log
      E1_LENGTHS=131072,16384 E1_MAX_S=400 \
        timeout 200 python3 -m experiments.bench --suite=E1 --out=$RUN/e1.json > $RUN/e1.log 2>&1
      echo e1_rc=\$? >> $RUN/e1.log
      touch $RUN/DONE" > /dev/null 2>&1 < /dev/null &
    echo started ;;
  poll)
    end=$((SECONDS + ${POLL_S:-540}))
    while [ ! -f $RUN/DONE ] && [ $SECONDS -lt $end ]; do sleep 10; done
    grep -E '^\[|rc=|Error' $RUN/repro.log | tail -20; tail -8 $RUN/e1.log 2>/dev/null
    [ -f $RUN/DONE ] && echo ALL_DONE
    mkdir -p ${OUT:-/tmp/out}
    tar czf ${OUT:-/tmp/out}/run.tgz -C $RUN --exclude=checkpoints . ;;
esac
