#!/bin/bash
# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
# Issue 21 on one H100/H200: every stage of experiments/retrieval.py (size=gpu) in order, detached
# from the calling shell so it survives a 10-minute command limit; poll to follow and collect.
#   bash experiments/scripts/gpu_retrieval.sh start   # returns at once
#   bash experiments/scripts/gpu_retrieval.sh poll    # waits up to POLL_S, packs the results
# Every stage runs one after the other: pack, widen, short, pretrain, the five branches (which
# all start from the pretrained model), eval and report. (Running the branches side by side on
# the one GPU took as long in total: lab log, 2026-12-06.) A stage that fails stops the chain;
# `start` again resumes (stages resume from checkpoints).
# RETRIEVAL_FLAGS is added to every stage's command (e.g. "--config.seed=1" for another seed;
# use a fresh RUN directory for it; "--config.branches=dense,dsa,window" leaves the random and
# frozen-indexer controls out, whose stages then return at once); RETRIEVAL_SIZE picks the
# config size (default gpu; cpu runs the whole chain on a laptop in minutes, to try the script).
# The chain runs from its own copy of the checkout ($RUN/src): a later device call replaces the
# checkout it was started from, and a process whose working directory is gone cannot start
# Python (session 8 lost its `eval` stage that way).
set -u
RUN=${RUN:-/tmp/retrieval_run}
CFG=experiments/configs/retrieval.py:size=${RETRIEVAL_SIZE:-gpu}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export DSA_COMMIT=${DSA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

stage() {  # one stage; its output lines and a "stage=... rc=..." line go to the log
  local t0=$SECONDS
  python3 -m experiments.retrieval --config=$CFG --workdir=$RUN/wd --stage=$1 \
    --results=$RUN/results ${RETRIEVAL_FLAGS:-} 2>&1 | grep --line-buffered -v '^[IW]1' \
    >> $RUN/retrieval.log
  local rc=${PIPESTATUS[0]}
  echo "stage=$1 rc=$rc s=$((SECONDS - t0))" >> $RUN/retrieval.log
  return $rc
}

branches() {  # the five branches, one after the other; 0 when all of them succeeded
  for s in dense warmup dsa window random frozen_indexer; do stage $s || return 1; done
}

case ${1:-start} in
  start)
    mkdir -p $RUN/src
    rm -f $RUN/DONE
    tar --exclude=./.git --exclude=./.venv -cf - . | tar -xf - -C $RUN/src
    setsid nohup bash $RUN/src/experiments/scripts/gpu_retrieval.sh chain > /dev/null 2>&1 \
      < /dev/null &
    echo started ;;
  chain)
    cd $RUN/src
    for s in pack widen short pretrain; do stage $s || { touch $RUN/DONE; exit 1; }; done
    branches || { touch $RUN/DONE; exit 1; }
    stage eval && stage report
    touch $RUN/DONE ;;
  poll)
    end=$((SECONDS + ${POLL_S:-540}))
    while [ ! -f $RUN/DONE ] && [ $SECONDS -lt $end ]; do sleep 10; done
    grep -E '^\[|rc=|Error' $RUN/retrieval.log | tail -30
    [ -f $RUN/DONE ] && echo ALL_DONE
    mkdir -p ${OUT:-/tmp/out}
    tar czf ${OUT:-/tmp/out}/retrieval_run.tgz -C $RUN --exclude=checkpoints --exclude=jax_cache \
      --exclude=./src . ;;
esac
