#!/bin/bash
# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
# Issue 21 on one H100/H200: every stage of experiments/retrieval.py (size=gpu) in order, detached
# from the calling shell so it survives a 10-minute command limit; poll to follow and collect.
#   bash experiments/scripts/gpu_retrieval.sh start   # returns at once
#   bash experiments/scripts/gpu_retrieval.sh poll    # waits up to POLL_S, packs the results
# A stage that fails stops the chain; `start` again resumes (stages resume from checkpoints).
# RETRIEVAL_FLAGS is added to every stage's command (e.g. "--config.seed=1" for another seed;
# use a fresh RUN directory for it).
# The chain runs from its own copy of the checkout ($RUN/src): a later device call replaces the
# checkout it was started from, and a process whose working directory is gone cannot start
# Python (session 8 lost its `eval` stage that way).
set -u
RUN=${RUN:-/tmp/retrieval_run}
CFG=experiments/configs/retrieval.py:size=gpu
STAGES="pack widen short pretrain dense warmup dsa window random frozen_indexer eval report"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export DSA_COMMIT=${DSA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
case ${1:-start} in
  start)
    mkdir -p $RUN/src
    rm -f $RUN/DONE
    tar --exclude=./.git --exclude=./.venv -cf - . | tar -xf - -C $RUN/src
    setsid nohup bash -c "
      cd $RUN/src
      for s in $STAGES; do
        t0=\$SECONDS
        python3 -m experiments.retrieval --config=$CFG --workdir=$RUN/wd --stage=\$s \
          --results=$RUN/results ${RETRIEVAL_FLAGS:-} 2>&1 | grep -v '^[IW]1' >> $RUN/retrieval.log
        rc=\${PIPESTATUS[0]}
        echo \"stage=\$s rc=\$rc s=\$((SECONDS - t0))\" >> $RUN/retrieval.log
        [ \$rc -eq 0 ] || break
      done
      touch $RUN/DONE" > /dev/null 2>&1 < /dev/null &
    echo started ;;
  poll)
    end=$((SECONDS + ${POLL_S:-540}))
    while [ ! -f $RUN/DONE ] && [ $SECONDS -lt $end ]; do sleep 10; done
    grep -E '^\[|rc=|Error' $RUN/retrieval.log | tail -30
    [ -f $RUN/DONE ] && echo ALL_DONE
    mkdir -p ${OUT:-/tmp/out}
    tar czf ${OUT:-/tmp/out}/retrieval_run.tgz -C $RUN --exclude=checkpoints --exclude=jax_cache \
      --exclude=./src . ;;
esac
