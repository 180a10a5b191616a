# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""CPU sweep for the retrieval curriculum (issue 21): which task / curriculum / optimiser lets
the dense model learn multi-query associative recall? A plain AdamW loop on `model.build` and
`losses.lm_loss` (no checkpoints), so a setting costs only its steps.

  taskset -c 1 python -m experiments.retrieval_sweep --stages=packed:256:16:1500 --lr=3e-3

--stages: comma-separated `task:L:batch:steps[:pairs[:n_keys[:n_values]]]` run in order on one model (a curriculum);
task `packed` (retrieval_data.packed_row: pairs and queries only, no filler), `filler`
(retrieval_data.train_row over text, text weight --text_weight), `copy` (a random byte string
written twice). Every --eval_every steps: held-out accuracy by distance bucket on the protocol's
eval rows (retrieval_data.eval_batch over text filler, at --eval_len, k = --topk).
"""

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from dsa_jax import config as model_config
from dsa_jax import data, losses, model, retrieval_data

F = flags.FLAGS
flags.DEFINE_string(
  "stages", "packed:256:16:1000", "task:L:batch:steps[:pairs[:n_keys[:n_values]]],..."
)
flags.DEFINE_string("preset", "retrieval_cpu", "model preset")
flags.DEFINE_string("model", "", "ModelConfig overrides k=v,... (ints/floats)")
flags.DEFINE_float("lr", 3e-3, "peak lr (every stage; warmup then cosine to 0.1x per stage)")
flags.DEFINE_integer("warmup", 100, "warmup steps per stage")
flags.DEFINE_float("wd", 0.1, "weight decay")
flags.DEFINE_float("embed_std", 1.0, "embedding init std (the model's default is 1.0)")
flags.DEFINE_float("text_weight", 0.0, "loss weight of the filler (task filler)")
flags.DEFINE_integer("eval_every", 250, "steps between evals")
flags.DEFINE_integer("eval_len", 256, "eval row length")
flags.DEFINE_integer("eval_pairs", 8, "queries per eval row")
flags.DEFINE_integer("eval_rows", 24, "eval rows")
flags.DEFINE_integer("topk", 32, "k for the eval buckets (retrieval_data.bucket_edges)")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_string("out", "", "append a JSON line with the run's record to this file")


def _overrides(s: str) -> dict:
  out = {}
  for kv in filter(None, s.split(",")):
    k, v = kv.split("=")
    out[k] = float(v) if "." in v or "e" in v else int(v)
  return out


def make_batch(task, rng, corpus, seq_len, batch, pairs, text_weight, n_keys, n_values):
  toks, masks = [], []
  for _ in range(batch):
    if task == "packed":
      t, m = retrieval_data.packed_row(rng, seq_len, pairs, n_keys, n_values)
    elif task == "filler":
      t, m = retrieval_data.train_row(rng, corpus, seq_len, pairs, 8, 0, text_weight)
    elif task == "copy":
      half = seq_len // 2
      s = rng.integers(128, 256, size=half)
      t = np.concatenate([s, s]).astype(np.int32)
      m = np.concatenate([np.zeros(half + 1), np.ones(half - 1)]).astype(np.float32)
    else:
      raise ValueError(task)
    toks.append(t)
    masks.append(m)
  return jnp.asarray(np.stack(toks)), jnp.asarray(np.stack(masks))


def main(argv):
  del argv
  cfg = model_config.preset(F.preset, **_overrides(F.model))
  stages = []
  for s in F.stages.split(","):
    p = s.split(":")
    stages.append(
      dict(
        task=p[0],
        L=int(p[1]),
        batch=int(p[2]),
        steps=int(p[3]),
        pairs=int(p[4]) if len(p) > 4 else 16,
        n_keys=int(p[5]) if len(p) > 5 else retrieval_data.N_KEYS,
        n_values=int(p[6]) if len(p) > 6 else 0,
      )
    )
  max_len = max([s["L"] for s in stages] + [F.eval_len])
  if cfg.max_seq_len < max_len:
    cfg = dataclasses.replace(cfg, max_seq_len=max_len, original_seq_len=max_len)
  m = model.build(cfg, seed=F.seed)
  if F.embed_std != 1.0:
    m.embed.value = m.embed.value * F.embed_std
  graphdef, params = nnx.split(m, nnx.Param)
  corpus = data.stdlib_corpus("train")
  edges = retrieval_data.bucket_edges(F.eval_len, F.topk)
  ev = retrieval_data.eval_batch(F.eval_len, edges, F.eval_rows, F.eval_pairs, seed=2121)
  ev_tok = jnp.asarray(ev["tokens"])

  @jax.jit
  def eval_fn(params):
    logits, _ = nnx.merge(graphdef, params)(ev_tok)
    pred = jnp.argmax(logits, -1)
    q = jnp.asarray(ev["query_pos"])
    return jnp.take_along_axis(pred, q, 1) == jnp.take_along_axis(ev_tok, q + 1, 1)

  def evaluate(params):
    c = np.asarray(eval_fn(params))
    return [round(float(c[ev["bucket"] == b].mean()), 3) for b in range(len(edges) - 1)]

  rec = dict(flags={k: F[k].value for k in F if k in _FLAG_NAMES}, evals=[])
  print("edges", edges, "params", model.param_count(params), flush=True)
  rng = np.random.default_rng(F.seed)
  t0 = time.perf_counter()
  step_total = 0
  for si, st in enumerate(stages):
    sched = optax.warmup_cosine_decay_schedule(
      0.0, F.lr, min(F.warmup, st["steps"] - 1), st["steps"], F.lr * 0.1
    )
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    opt = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=F.wd, mask=decay_mask),
    )
    opt_state = opt.init(params)

    @jax.jit
    def step_fn(params, opt_state, tok, mask, opt=opt):
      def loss_fn(p):
        logits, _ = nnx.merge(graphdef, p)(tok)
        loss = losses.lm_loss(logits, tok, mask)
        pred = jnp.argmax(logits[:, :-1], -1)
        w = mask[:, 1:] == 1.0
        acc = jnp.sum((pred == tok[:, 1:]) & w) / jnp.maximum(jnp.sum(w), 1)
        return loss, acc

      (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
      upd, opt_state = opt.update(g, opt_state, params)
      return optax.apply_updates(params, upd), opt_state, loss, acc

    la = []
    for i in range(st["steps"]):
      tok, mask = make_batch(
        st["task"],
        rng,
        corpus,
        st["L"],
        st["batch"],
        st["pairs"],
        F.text_weight,
        st["n_keys"],
        st["n_values"],
      )
      params, opt_state, loss, acc = step_fn(params, opt_state, tok, mask)
      la.append((float(loss), float(acc)))
      step_total += 1
      last = i == st["steps"] - 1
      if (i + 1) % F.eval_every == 0 or last:
        lm = np.mean(la[-50:], 0)
        e = evaluate(params)
        wall = time.perf_counter() - t0
        rec["evals"].append(
          dict(stage=si, step=step_total, loss=lm[0], train_acc=lm[1], eval=e, wall=wall)
        )
        print(
          f"stage {si} {st['task']} step {step_total} loss {lm[0]:.3f} train_acc {lm[1]:.3f} "
          f"eval {e} wall {wall:.0f}s",
          flush=True,
        )
  if F.out:
    with open(F.out, "a") as f:
      f.write(json.dumps(rec) + "\n")


_FLAG_NAMES = (
  "stages preset model lr warmup wd embed_std text_weight eval_len eval_pairs topk seed".split()
)

if __name__ == "__main__":
  app.run(main)
