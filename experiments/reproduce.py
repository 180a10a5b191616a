# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""Reproduces the DSA claim at small scale: dense pretrain, then two equal-token branches.

  CFG=experiments/configs/reproduce.py:size=h200; WD=/tmp/repro
  python -m experiments.reproduce --config=$CFG --workdir=$WD --stage=pretrain  # dense, P steps
  python -m experiments.reproduce --config=$CFG --workdir=$WD --stage=dense     # A: W+S dense
  python -m experiments.reproduce --config=$CFG --workdir=$WD --stage=warmup    # B1: W indexer-only
  python -m experiments.reproduce --config=$CFG --workdir=$WD --stage=sparse    # B2: S sparse
  python -m experiments.reproduce --config=$CFG --workdir=$WD --stage=eval      # held-out metrics
  python -m experiments.reproduce --config=$CFG --workdir=$WD --stage=report    # JSON + plots

`--stage=all` runs them in order; every training stage resumes from its own checkpoints, so a
killed stage re-run continues where it stopped. `report` needs only WD's JSON files (it can run
on another machine). The protocol and its reasoning are in WORKSPACE.md ("Reproduction").
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from dsa_jax import data, train
from experiments.configs import common

_CONFIG = config_flags.DEFINE_config_file(
  "config", "experiments/configs/reproduce.py", "reproduction config", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (all stages)", required=True)
STAGES = ("pretrain", "dense", "warmup", "sparse", "eval", "report")
_STAGE = flags.DEFINE_enum("stage", "all", STAGES + ("all",), "which stage to run")
_RESULTS = flags.DEFINE_string(
  "results", "experiments/results", "where `report` writes reproduction.json and plots"
)

# stage -> (phase, the stage whose final params it starts from)
PLAN = {
  "pretrain": ("dense", None),
  "dense": ("dense", "pretrain"),
  "warmup": ("warmup", "pretrain"),
  "sparse": ("sparse", "warmup"),
}


def stage_steps(c, stage: str) -> int:
  s = c.steps
  return {
    "pretrain": s.pretrain,
    "dense": s.warmup + s.sparse,  # equal token budget with warm-up + sparse
    "warmup": s.warmup,
    "sparse": s.sparse,
  }[stage]


def stage_config(c, stage: str, workdir: str) -> train.TrainConfig:
  phase, parent = PLAN[stage]
  steps = stage_steps(c, stage)
  model = dict(c.model)
  if jax.default_backend() == "cpu":
    model["impl"] = "reference"  # the Pallas kernels are GPU/TPU code; CPU runs the references
  t = common.make_config(
    phase,
    c.model.preset,
    steps,
    model=model,
    data_=dict(
      source="mixed",
      seq_len=c.seq_len,
      batch_size=c.batch_size,
      seed=c.seed + (0 if stage == "pretrain" else 1),  # branches see data the pretrain did not
      passkey_share=c.data.passkey_share,
      mqar_share=c.data.mqar_share,
      mqar_pairs=c.data.mqar_pairs,
    ),
  )
  t.optim.update(
    lr=c.lr[stage], warmup_steps=max(1, steps // 20), total_steps=steps, min_lr_ratio=0.1
  )
  t.ckpt.update(
    every=max(1, min(100, steps)),
    keep=2,
    async_save=False,
    init_from=os.path.join(workdir, parent) if parent else "",
  )
  t.update(
    seed=c.seed,
    log_every=max(1, min(10, steps // 4)),
    eval_batches=1,
    # the pretrain's indexer is untrained: its recall is measured once, on branch A (same params)
    eval_metrics=stage != "pretrain",
    progress=False,
  )
  return common.to_train_config(t)


def run_stage(c, stage: str, workdir: str) -> dict:
  wd = os.path.join(workdir, stage)
  t0 = time.perf_counter()
  r = train.train(stage_config(c, stage, workdir), wd)
  out = {
    "stage": stage,
    "steps": r["step"],
    "tokens": r["step"] * c.batch_size * c.seq_len,
    "wall_s": time.perf_counter() - t0,
    "device": jax.devices()[0].device_kind,
    "commit": _commit(),
    "date": time.strftime("%Y-%m-%d"),
    "train": r["train"],
    "eval": r.get("eval", {}),
  }
  with open(os.path.join(workdir, f"stage_{stage}.json"), "w") as f:
    json.dump(out, f, indent=1)
  print(f"[{stage}] {json.dumps({k: out[k] for k in ('steps', 'wall_s')})} {out['train']}")
  return r


# ------------------------------------------------------------------------------------ evaluation
_FWD = {}


def forward_fn(m, attention: str):
  """(state, tokens [1,L]) -> logits, jitted once per (model config, attention): the three
  evaluated checkpoints share the compile."""
  key = (m.cfg, attention)
  if key not in _FWD:
    graphdef = nnx.graphdef(m)
    _FWD[key] = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t, attention=attention)[0])
  return _FWD[key]


def logits_of(m, attention, toks):
  fn = forward_fn(m, attention)
  st = nnx.state(m)
  return np.stack([np.asarray(fn(st, jnp.asarray(t[None])))[0] for t in toks])


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def position_loss(logits, toks):
  """Mean next-token NLL per target position [L-1] (index t: the loss of token t+1)."""
  lp = _log_softmax(logits[:, :-1])
  return -np.take_along_axis(lp, toks[:, 1:, None], axis=-1)[..., 0].mean(0)


def bucketed(per_pos, buckets):
  """per_pos[t] is the loss of predicting token t+1: bucket by that target position."""
  pos = np.arange(1, len(per_pos) + 1)
  out = {}
  for lo, hi in zip(buckets[:-1], buckets[1:]):
    sel = (pos >= lo) & (pos < hi)
    if sel.any():
      out[f"{lo}-{hi}"] = float(per_pos[sel].mean())
  return out


def answer_accuracy(logits, toks, mask, dist):
  """Teacher-forced argmax on the answer tokens: (share right, all right) by distance."""
  hit = logits[:, :-1].argmax(-1) == toks[:, 1:]
  m = mask[:, 1:] > 0
  share = (hit & m).sum(-1) / np.maximum(m.sum(-1), 1)
  exact = np.all(hit | ~m, axis=-1)
  ds = sorted(set(dist.tolist()))
  return (
    {int(d): float(share[dist == d].mean()) for d in ds},
    {int(d): float(exact[dist == d].mean()) for d in ds},
  )


def evaluate(c, workdir: str) -> dict:
  """Held-out metrics of the pretrained model and both branches' final checkpoints."""
  e = c.eval
  text = data.batch(
    data.DataConfig(source="text", seq_len=c.seq_len, batch_size=e.text_rows, seed=c.seed),
    0,
    split="eval",
  )["tokens"]
  pk = data.passkey_eval_batch(c.seq_len, e.passkey_distances, e.per_distance)
  mq = data.mqar_eval_batch(c.seq_len, e.mqar_distances, e.per_distance)
  out = {}
  for stage, attention in (("pretrain", "dense"), ("dense", "dense"), ("sparse", "sparse")):
    t0 = time.perf_counter()
    cfg = stage_config(c, stage, workdir)
    m = train.load_init_params(os.path.join(workdir, stage), cfg.model)
    per_pos = position_loss(logits_of(m, attention, text), text)
    pk_digit, pk_exact = answer_accuracy(logits_of(m, attention, pk[0]), *pk)
    mq_share, _ = answer_accuracy(logits_of(m, attention, mq[0]), *mq)
    with open(os.path.join(workdir, f"stage_{stage}.json")) as f:
      st = json.load(f)
    out[stage] = {
      "attention": attention,
      "step": st["steps"],
      "loss_mean": float(per_pos.mean()),
      "loss_by_position": bucketed(per_pos, e.buckets),
      "passkey_exact": pk_exact,
      "passkey_digit": pk_digit,
      "mqar": mq_share,
      "indexer_recall_per_layer": st["eval"].get("indexer_recall_per_layer"),
      "topk_overlap": st["eval"].get("topk_overlap"),
      "eval_s": time.perf_counter() - t0,
    }
    print(f"[eval {stage}] loss {out[stage]['loss_mean']:.4f} {out[stage]['loss_by_position']}")
  out["device"] = jax.devices()[0].device_kind
  out["commit"] = _commit()
  out["date"] = time.strftime("%Y-%m-%d")
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(out, f, indent=1)
  return out


# ---------------------------------------------------------------------------------------- report
def report(c, workdir: str, results_dir: str) -> dict:
  ev = json.load(open(os.path.join(workdir, "eval.json")))
  st = {s: json.load(open(os.path.join(workdir, f"stage_{s}.json"))) for s in PLAN}
  warm_recall = st["warmup"]["eval"].get("indexer_recall_per_layer")
  tps = {s: st[s]["train"].get("tokens_per_s") for s in PLAN}
  branch_wall = {
    "dense": st["dense"]["wall_s"],
    "dsa": st["warmup"]["wall_s"] + st["sparse"]["wall_s"],
  }
  rep = {
    "suite": "reproduction",
    "date": time.strftime("%Y-%m-%d"),
    "device": st["pretrain"]["device"],
    "commit": _commit(),
    "command": "python -m experiments.reproduce --config=experiments/configs/reproduce.py:"
    f"size={c.size} --workdir=WD --stage=<pretrain|dense|warmup|sparse|eval|report>",
    "config": {
      "seq_len": c.seq_len,
      "batch_size": c.batch_size,
      "index_topk": c.model.index_topk,
      "steps": dict(c.steps),
      "lr": dict(c.lr),
      "tokens": {s: st[s]["tokens"] for s in PLAN},
    },
    "eval": ev,
    "indexer_recall_per_layer": {
      "before_warmup": ev["dense"]["indexer_recall_per_layer"],
      "after_warmup": warm_recall,
      "after_sparse": ev["sparse"]["indexer_recall_per_layer"],
    },
    "tokens_per_s": tps,
    "wall_s": {s: st[s]["wall_s"] for s in PLAN}
    | {"branch_" + k: v for k, v in branch_wall.items()},
    "parity": {
      "loss_delta_dsa_minus_dense": ev["sparse"]["loss_mean"] - ev["dense"]["loss_mean"],
      "sparse_over_dense_train_tokens_per_s": (tps["sparse"] or 0)
      / max(tps["dense"] or 1e-9, 1e-9),
    },
  }
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, "reproduction.json"), "w") as f:
    json.dump(rep, f, indent=1)
  _plots(rep, os.path.join(results_dir, "reproduction.png"))
  return rep


def _commit():
  from experiments import bench_common  # noqa: PLC0415

  return bench_common.commit()


def _plots(rep, path):
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed: no plot")
    return
  ev = rep["eval"]
  fig, ax = plt.subplots(1, 4, figsize=(18, 3.8))
  names = {"pretrain": "pretrained (start)", "dense": "A: dense", "sparse": "B: DSA"}
  for s, lab in names.items():
    lb = ev[s]["loss_by_position"]
    ax[0].plot(range(len(lb)), list(lb.values()), "o-", label=lab)
  ax[0].set_xticks(range(len(lb)), list(lb), rotation=30, fontsize=7)
  ax[0].set_title("held-out loss by token position")
  ax[0].legend(fontsize=7)
  for s in ("dense", "sparse"):
    for key, ls in (("passkey_digit", "-"), ("mqar", "--")):
      acc = ev[s][key]
      ax[1].plot([int(d) for d in acc], list(acc.values()), "o" + ls, label=f"{names[s]} {key}")
  ax[1].set_xscale("symlog")
  ax[1].set_ylim(0, 1.02)
  ax[1].set_title("retrieval accuracy vs distance")
  ax[1].legend(fontsize=6)
  for k, v in rep["indexer_recall_per_layer"].items():
    if v is not None:
      ax[2].plot(range(len(v)), v, "o-", label=k)
  ax[2].set_ylim(0, 1.02)
  ax[2].set_title(f"indexer recall of dense attention (top-{rep['config']['index_topk']})")
  ax[2].set_xlabel("layer")
  ax[2].legend(fontsize=7)
  tps = rep["tokens_per_s"]
  cfgs = rep["config"]
  ms = {s: 1e3 * cfgs["batch_size"] * cfgs["seq_len"] / v for s, v in tps.items() if v}
  ax[3].bar(list(ms), list(ms.values()), color=["C0", "C0", "C2", "C1"][: len(ms)])
  ax[3].set_title(f"ms per training step (L={cfgs['seq_len']})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"plots: {path}")


def main(argv):
  del argv
  c = _CONFIG.value
  wd = os.path.abspath(_WORKDIR.value)
  os.makedirs(wd, exist_ok=True)
  stages = STAGES if _STAGE.value == "all" else (_STAGE.value,)
  for s in stages:
    if s in PLAN:
      run_stage(c, s, wd)
    elif s == "eval":
      evaluate(c, wd)
    else:
      rep = report(c, wd, _RESULTS.value)
      print(json.dumps(rep["parity"]))


if __name__ == "__main__":
  app.run(main)
