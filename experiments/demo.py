# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""The two-phase DSA demo on embedded data (stdlib source text + pass-key + MQAR), CPU-sized.

  python -m experiments.demo --workdir=/tmp/dsa_demo            # ~10 min on 2 CPU cores
  python -m experiments.demo --workdir=/tmp/dsa_demo --size=ci  # seconds-scale smoke run

Protocol (the paper's, docs/dsa.md §Training, at toy scale): a dense model is trained for
`dense_steps`; from its checkpoint at that step two branches with the same LM-token budget:
  dense: continued dense training for `sparse_steps` more steps;
  DSA:   indexer warm-up (`warmup_steps`, dense attention, KL, only the indexer trains), then
         sparse training (`sparse_steps`, top-k = L/8 attention, LM + sparse KL).
Prints a table and writes DIR/report.json and DIR/report.png.
"""

import json
import os
import signal
import sys
import time

import numpy as np
from absl import app, flags, logging

from dsa_jax import train
from experiments.configs import common

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/dsa_demo", "output directory")
_SIZE = flags.DEFINE_enum("size", "default", ["default", "ci"], "default: the demo; ci: smoke size")

# size: (seq_len, batch, dense_steps, warmup_steps, sparse_steps, distances)
SIZES = {
  "default": (1024, 2, 150, 40, 50, (16, 128, 512, 960)),
  "ci": (1024, 1, 4, 2, 2, (16, 960)),
}


def phase_config(name, seq_len, bs, steps, total, lr, init_from=None, every=None, keep=2):
  """One phase of the demo: the `demo` preset (dsa_jax.config.PRESETS, L=1024, top-k = L/8)."""
  c = common.make_config(
    name,
    "demo",
    steps,
    data_=dict(source="mixed", seq_len=seq_len, batch_size=bs, passkey_share=0.3),
  )
  c.optim.update(lr=lr, warmup_steps=max(1, total // 20), total_steps=total)
  c.ckpt.update(every=every or steps, keep=keep, async_save=False, init_from=init_from or "")
  c.update(log_every=max(1, steps // 10), eval_batches=2)
  return common.to_train_config(c)


def run_phase(name, workdir, cfg):
  """Trains (or reuses the finished) phase in workdir: (result, its trainer)."""
  if train.finished_step(workdir) == cfg.steps:
    print(f"{name}: reusing the finished run in {workdir} (step {cfg.steps}); delete it to retrain")
  t0 = time.perf_counter()
  trainer = train.Trainer(cfg)
  try:
    r = train.train(cfg, workdir, trainer=trainer)
  except (ValueError, train.NonFiniteError) as e:
    print(f"error: {name}: {e}", file=sys.stderr)
    sys.exit(3 if isinstance(e, train.NonFiniteError) else 2)
  if r["preempted"]:
    print(f"stopped by {r['signal']} in {name} at step {r['step']}, saved; rerun to resume")
    sys.exit(128 + int(getattr(signal, r["signal"])))
  r["wall_s"] = time.perf_counter() - t0
  return r, trainer


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # Orbax / absl INFO chatter only on request
    logging.set_verbosity(logging.WARNING)
  t_start = time.perf_counter()
  seq_len, bs, n_dense, n_warm, n_sparse, distances = SIZES[_SIZE.value]
  wd = os.path.abspath(_WORKDIR.value)
  os.makedirs(wd, exist_ok=True)
  dc = dict(seq_len=seq_len, bs=bs)
  total_dense = n_dense + n_sparse
  # Dense run: checkpoints at the branch point and at the end (the dense branch).
  dense_cfg = phase_config(
    "dense", **dc, steps=total_dense, total=total_dense, lr=3e-3, every=n_dense
  )
  dense, dense_tr = run_phase("dense", f"{wd}/dense", dense_cfg)
  branch = f"{wd}/dense@{n_dense}"
  warm_cfg = phase_config("warmup", **dc, steps=n_warm, total=n_warm, lr=3e-3, init_from=branch)
  warm, _ = run_phase("warmup", f"{wd}/warmup", warm_cfg)
  sparse_cfg = phase_config(
    "sparse", **dc, steps=n_sparse, total=total_dense, lr=3e-3, init_from=f"{wd}/warmup"
  )
  sparse, sparse_tr = run_phase("sparse", f"{wd}/sparse", sparse_cfg)
  mc = sparse_cfg.model
  # the final states are the runs' newest checkpoints
  acc_dense = dense_tr.retrieval_accuracy(train.restore_latest(dense_tr, f"{wd}/dense"), distances)
  acc_dsa = sparse_tr.retrieval_accuracy(train.restore_latest(sparse_tr, f"{wd}/sparse"), distances)
  report = {
    "seq_len": seq_len,
    "index_topk": mc.index_topk,
    "steps": {"dense": total_dense, "branch_at": n_dense, "warmup": n_warm, "sparse": n_sparse},
    "dense_eval_loss": dense["eval"]["eval_loss"],
    "dsa_eval_loss": sparse["eval"]["eval_loss"],
    "recall_after_warmup": warm["eval"]["indexer_recall"],
    "recall_after_sparse": sparse["eval"]["indexer_recall"],
    "topk_overlap_after_warmup": warm["eval"]["topk_overlap"],
    "topk_overlap_after_sparse": sparse["eval"]["topk_overlap"],
    "recall_before_warmup": dense["eval"]["indexer_recall"],
    # per-digit pass-key accuracy (chance 0.1); exact 5-digit match below
    "retrieval_accuracy": {"dense": acc_dense["digit"], "dsa": acc_dsa["digit"]},
    "retrieval_exact_match": {"dense": acc_dense["exact"], "dsa": acc_dsa["exact"]},
    "tokens_per_s": {
      k: r["train"].get("tokens_per_s")
      for k, r in (("dense", dense), ("warmup", warm), ("sparse", sparse))
    },
    "wall_s": {"dense": dense["wall_s"], "warmup": warm["wall_s"], "sparse": sparse["wall_s"]},
  }
  report["wall_s"]["total"] = time.perf_counter() - t_start
  with open(os.path.join(wd, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  _plot(report, os.path.join(wd, "report.png"))
  rows = [
    ("eval loss (held-out stdlib + tasks)", report["dense_eval_loss"], report["dsa_eval_loss"]),
    (
      "indexer recall of dense attention mass",
      report["recall_before_warmup"],
      report["recall_after_sparse"],
    ),
  ] + [
    (f"pass-key digit accuracy @ distance {d}", acc_dense["digit"][d], acc_dsa["digit"][d])
    for d in distances
  ]
  print(
    f"\nDSA demo: L={seq_len}, top-k={mc.index_topk}; recall after warm-up "
    f"{report['recall_after_warmup']:.3f} (before: {report['recall_before_warmup']:.3f}), "
    f"after sparse {report['recall_after_sparse']:.3f}"
  )
  print(f"{'metric':<42}{'dense':>10}{'DSA':>10}")
  for name, a, b in rows:
    print(f"{name:<42}{a:>10.4f}{b:>10.4f}")
  print(f"wall time {report['wall_s']['total']:.0f} s; report: {wd}/report.json, {wd}/report.png")


def _plot(report, path):
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed: no plot")
    return
  fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
  ax[0].bar(
    ["dense", "DSA"], [report["dense_eval_loss"], report["dsa_eval_loss"]], color=["C0", "C1"]
  )
  ax[0].set_title("held-out eval loss")
  ax[1].bar(
    ["before warm-up", "after warm-up", "after sparse"],
    [report["recall_before_warmup"], report["recall_after_warmup"], report["recall_after_sparse"]],
    color="C2",
  )
  ax[1].set_ylim(0, 1)
  ax[1].set_title(f"indexer recall (top-{report['index_topk']} of {report['seq_len']})")
  acc = report["retrieval_accuracy"]
  d = sorted(acc["dense"])
  x = np.arange(len(d))
  ax[2].bar(x - 0.2, [acc["dense"][k] for k in d], 0.4, label="dense")
  ax[2].bar(x + 0.2, [acc["dsa"][k] for k in d], 0.4, label="DSA")
  ax[2].set_xticks(x, [str(k) for k in d])
  ax[2].set_xlabel("pass-key distance (tokens)")
  ax[2].set_ylim(0, 1)
  ax[2].legend()
  ax[2].set_title("pass-key digit accuracy (chance 0.1)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


if __name__ == "__main__":
  app.run(main)
