# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""Benchmarks (docs/benchmarks.md: suites, protocol, result format). One command per set of suites:

  python -m experiments.bench --suite=S1,S2,S3 [--out=experiments/results/sparse_mla.json]
  python -m experiments.bench --suite=I1,T1,E1 [--small]
  python -m experiments.bench --suite=E1_V4 [--small]         # DeepSeek-V4 CSA layer

Each suite module registers `SUITES = {id: fn(small: bool) -> list[row]}`; rows follow the
result format of docs/benchmarks.md and carry the baseline measured in the same run.
"""

import importlib
import json

from absl import app, flags

from experiments import bench_common

_SUITE = flags.DEFINE_list("suite", ["S1"], "suite ids, e.g. S1,S2,S3,I1,T1,E1")
_OUT = flags.DEFINE_string("out", None, "result JSON (default: experiments/results/<suite>.json)")
_SMALL = flags.DEFINE_bool("small", False, "tiny shapes: a smoke test of the harness on CPU")

# suite id -> module holding it (modules are imported lazily so a missing one fails only its suite)
_MODULES = {
  "S1": "experiments.bench_sparse_mla",
  "S2": "experiments.bench_sparse_mla",
  "S3": "experiments.bench_sparse_mla",
  "I1": "experiments.bench_indexer",
  "T1": "experiments.bench_indexer",
  "E1": "experiments.bench_indexer",
  "E1_V4": "experiments.bench_v4",
  **dict.fromkeys(("D1", "COST"), "experiments.bench_decode"),
  "M1": "experiments.bench_train",
  **dict.fromkeys(
    ("S1_TPU", "S2_TPU", "S3_TPU", "I1_TPU", "T1_TPU", "RECALL_TPU"), "experiments.bench_tpu"
  ),
}


def main(argv):
  del argv
  for sid in _SUITE.value:
    if sid not in _MODULES:
      raise app.UsageError(f"--suite={sid} unknown; expected one of {sorted(_MODULES)}")
    mod = importlib.import_module(_MODULES[sid])
    rows = mod.SUITES[sid](_SMALL.value)
    for r in rows:
      print(json.dumps(r))
    out = _OUT.value or f"experiments/results/{sid}.json"
    bench_common.write_results(out, rows)


if __name__ == "__main__":
  app.run(main)
