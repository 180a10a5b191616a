# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""Decode and prefill cost per token vs position, dense MLA vs DSA, `1b` preset (suite D1).

  python -m experiments.bench --suite=D1,COST --out=experiments/results/decode.json
  DSA_BENCH_POSITIONS=4096,32768,131072 DSA_BENCH_BATCH=8 DSA_BENCH_FP8=1 python -m experiments.bench \
    --suite=D1,COST --out=experiments/results/decode.json

Both suites share one measurement (run once per process). At every position p:
- decode: one token per request appended at position ~p (batch B, caches holding p tokens of
  random content: timing does not depend on the values); per-token time = step time / B.
  The cache is donated and threaded through the timed steps, as in serving.
- prefill: a chunk of DSA_BENCH_CHUNK tokens at positions p..p+chunk-1 after p cached tokens
  (chunked prefill); per-token time = chunk time / chunk.
Dense MLA attends to every cached slot (absorbed MQA form); DSA scores all slots with the
lightning indexer, keeps top-2048 and runs sparse MLA on them. Everything else (projections,
MoE, head) is identical, as between V3.1-Terminus and V3.2-Exp.

D1 rows: DSA decode time per token vs dense (the baseline) at each context; ratio > 1: DSA faster.
COST rows: per position, prefill and decode $ per million tokens at $2/GPU-hour (the convention
of Figure 3 in DeepSeek's V3.2-Exp report) for both, plus a summary row with the crossover
positions.
The plot (time per million tokens vs position, crossovers marked) goes beside the JSON.
rel_err: decode vs full forward logits on the `test` preset in the bench's compute dtype on the
same device (the correctness check of the path timed here; CPU tests cover fp32).

Env knobs: DSA_BENCH_POSITIONS (default 4096,16384,65536,131072), DSA_BENCH_BATCH (1),
DSA_BENCH_CHUNK (1024), DSA_BENCH_ITERS (10 decode; prefill uses half, >= 3), DSA_BENCH_FP8 (0),
DSA_BENCH_IMPL (reference | pallas: the sparse-MLA / top-k kernels; decode top-k is always XLA).
"""

import functools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dsa_jax
from dsa_jax import cache as cache_lib
from dsa_jax import generate, model
from experiments import bench_common as bc

DOLLARS_PER_GPU_HOUR = 2.0  # DeepSeek's Figure 3 (H800 service)


def _env_ints(name, default):
  return [int(x) for x in os.environ.get(name, default).split(",") if x]


def _settings(small: bool) -> dict:
  if small:
    return dict(
      cfg=dsa_jax.preset("test", n_layers=1, n_dense_layers=1, index_topk=16),
      positions=[32, 96],
      batch=1,
      chunk=16,
      iters=2,
      fp8=os.environ.get("DSA_BENCH_FP8", "0") == "1",
    )
  positions = _env_ints("DSA_BENCH_POSITIONS", "4096,16384,65536,131072")
  chunk = int(os.environ.get("DSA_BENCH_CHUNK", "1024"))
  cfg = dsa_jax.preset(
    "1b",
    param_dtype="bfloat16",  # serving weights: halves the per-step weight reads
    max_seq_len=max(max(positions) + chunk + 64, 32768),
    impl=os.environ.get("DSA_BENCH_IMPL", "reference"),
    remat=False,
  )
  return dict(
    cfg=cfg,
    positions=positions,
    batch=int(os.environ.get("DSA_BENCH_BATCH", "1")),
    chunk=chunk,
    iters=int(os.environ.get("DSA_BENCH_ITERS", "10")),
    fp8=os.environ.get("DSA_BENCH_FP8", "0") == "1",
  )


def _random_cache(cfg, batch, max_len, length, fp8, indexer, seed):
  """A cache whose first `length` slots hold random rows (magnitudes as after the norms)."""
  c0 = cache_lib.init(cfg, batch, max_len, fp8=fp8, indexer=indexer)

  @jax.jit
  def fill(c0, key):
    new = []
    pos = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32)[None], (batch, max_len))
    for i, lc in enumerate(c0.layers):
      k = jax.random.split(jax.random.fold_in(key, i), 3)
      c = jax.random.normal(k[0], (batch, max_len, cfg.kv_lora_rank), jnp.bfloat16)
      pe = jax.random.normal(k[1], (batch, max_len, cfg.qk_rope_head_dim), jnp.bfloat16)
      ik = jax.random.normal(k[2], (batch, max_len, cfg.index_head_dim), jnp.bfloat16)
      new.append(cache_lib.write(cfg, lc, pos, c, pe, ik if indexer else None))
    return c0.replace(layers=tuple(new), lengths=jnp.full((batch,), length, jnp.int32))

  return fill(c0, jax.random.key(seed))


def _median_ms(run, warmup: int, iters: int) -> float:
  for _ in range(warmup):
    run()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    run()
    times.append((time.perf_counter() - t0) * 1e3)
  return float(np.median(times))


def _time_decode(graphdef, state, cfg, s, p, attention):
  b, iters = s["batch"], s["iters"]
  cache = _random_cache(cfg, b, p + iters + 8, p, s["fp8"], attention == "sparse", seed=p)
  tok = jnp.ones((b, 1), jnp.int32)
  box = {"cache": cache}

  def run():
    box["logits"], box["cache"] = generate.decode_step(
      graphdef, state, tok, box["cache"], attention=attention
    )
    box["logits"].block_until_ready()

  ms = _median_ms(run, 2, iters) / b
  if not bool(jnp.isfinite(box["logits"]).all()):
    raise RuntimeError(f"non-finite decode logits ({attention}, position {p})")
  return ms


def _time_prefill(graphdef, state, cfg, s, p, attention):
  b, t = s["batch"], s["chunk"]
  cache = _random_cache(cfg, b, p + t, p, s["fp8"], attention == "sparse", seed=p + 1)
  tok = jax.random.randint(jax.random.key(p), (b, t), 0, cfg.vocab_size)
  lengths = jnp.full((b,), p + t, jnp.int32)
  box = {"cache": cache}

  def run():  # rewrites the same chunk slots each time: same work every call
    logits, box["cache"] = generate.prefill_step(
      graphdef, state, tok, lengths, box["cache"], attention=attention, start=p
    )
    logits.block_until_ready()

  return _median_ms(run, 1, max(3, s["iters"] // 2)) / (b * t)


def _decode_rel_err(dtype: str) -> float:
  """Prefill + decode vs full forward logits on the test preset (sparse, this device)."""
  cfg = dsa_jax.preset("test", compute_dtype=dtype)
  m = model.build(cfg, seed=0)
  gd, st = nnx.split(m)
  n, p = 48, 8
  tok = jax.random.randint(jax.random.key(0), (1, n), 0, cfg.vocab_size)
  ref = jax.jit(lambda st, t: nnx.merge(gd, st)(t, attention="sparse")[0])(st, tok)
  cache = cache_lib.init(cfg, 1, n)
  lg, cache = generate.prefill_step(gd, st, tok[:, :p], jnp.array([p]), cache, attention="sparse")
  got = [lg]
  for i in range(p, n - 1):
    lg, cache = generate.decode_step(gd, st, tok[:, i : i + 1], cache, attention="sparse")
    got.append(lg[:, 0])
  return bc.rel_err(jnp.stack(got, 1), ref[:, p - 1 : n - 1])


def _crossover(positions, dense, sparse):
  """First position where DSA becomes cheaper (linear interpolation), None if it never does."""
  d = np.asarray(sparse) - np.asarray(dense)
  if d[0] <= 0:
    return float(positions[0])
  for i in range(1, len(d)):
    if d[i] <= 0:
      f = d[i - 1] / (d[i - 1] - d[i])
      return float(positions[i - 1] + f * (positions[i] - positions[i - 1]))
  return None


def _cost(ms_per_token: float) -> float:
  return ms_per_token * 1e-3 * 1e6 * DOLLARS_PER_GPU_HOUR / 3600.0


@functools.lru_cache(maxsize=None)
def measure(small: bool) -> dict:
  s = _settings(small)
  cfg = s["cfg"]
  on_cpu = jax.default_backend() == "cpu"
  t0 = time.perf_counter()
  m = model.build(cfg, seed=0, on_host=on_cpu)
  graphdef, state = nnx.split(m)
  out = {"settings": {k: v for k, v in s.items() if k != "cfg"}, "positions": s["positions"]}
  for phase, fn in (("decode", _time_decode), ("prefill", _time_prefill)):
    for attention in ("dense", "sparse"):
      out[f"{phase}_{attention}"] = [
        fn(graphdef, state, cfg, s, p, attention) for p in s["positions"]
      ]
      print(f"# {phase} {attention} ms/token: {out[f'{phase}_{attention}']}", flush=True)
  out["rel_err"] = _decode_rel_err("float32" if on_cpu else cfg.compute_dtype)
  out["wall_s"] = time.perf_counter() - t0
  out["cfg"] = cfg
  return out


def _shape(r, p):
  cfg = r["cfg"]
  st = r["settings"]
  return {
    "preset": "test" if cfg.vocab_size == 256 else "1b",
    "position": p,
    "batch": st["batch"],
    "prefill_chunk": st["chunk"],
    "index_topk": cfg.index_topk,
    "cache": "fp8" if st["fp8"] else cfg.compute_dtype,
    "impl": cfg.impl,
    "n_layers": cfg.n_layers,
  }


def suite_d1(small: bool):
  r = measure(small)
  rows = []
  for i, p in enumerate(r["positions"]):
    dense, sparse = r["decode_dense"][i], r["decode_sparse"][i]
    rows.append(
      bc.row(
        "D1",
        _shape(r, p),
        sparse,
        None,
        rel_err=r["rel_err"],
        unit="ms per decoded token (step time / batch)",
        baseline={"name": "dense_mla_decode_same_model", "time_ms": dense},
      )
    )
  return rows


def suite_cost(small: bool):
  r = measure(small)
  pos = r["positions"]
  rows = []
  for i, p in enumerate(pos):
    rows.append(
      bc.row(
        "COST",
        _shape(r, p),
        r["decode_sparse"][i],
        None,
        rel_err=r["rel_err"],
        ms_per_token={k: r[k][i] for k in r if k.startswith(("decode_", "prefill_"))},
        usd_per_mtok={k: _cost(r[k][i]) for k in r if k.startswith(("decode_", "prefill_"))},
        baseline={"name": "dense_mla_decode_same_model", "time_ms": r["decode_dense"][i]},
      )
    )
  cross = {ph: _crossover(pos, r[f"{ph}_dense"], r[f"{ph}_sparse"]) for ph in ("prefill", "decode")}
  rows.append(
    bc.row(
      "COST",
      {**_shape(r, None), "position": pos},
      None,
      None,
      summary=True,
      crossover_position=cross,
      wall_s=r["wall_s"],
      deepseek_fig3_crossover_h800={"prefill": 10000, "decode": 4500},
    )
  )
  # the smoke run must not overwrite the committed figure
  _plot(
    r, cross, os.path.join(tempfile.gettempdir() if small else "experiments/results", "decode.png")
  )
  return rows


def _plot(r, cross, path):
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  pos = np.asarray(r["positions"]) / 1024
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, ph in zip(axes, ("prefill", "decode")):
    for att, label, style in (("dense", "dense MLA", "o-"), ("sparse", "DSA", "s-")):
      ax.plot(pos, [x * 1e3 for x in r[f"{ph}_{att}"]], style, label=label)  # s per M tokens
    if cross[ph] is not None:
      ax.axvline(
        cross[ph] / 1024, color="gray", ls=":", label=f"crossover ~{cross[ph] / 1024:.1f}K"
      )
    ax.set(
      title=f"{ph} ({r['settings']['batch']} req, {jax.devices()[0].device_kind})",
      xlabel="token position (K)",
      ylabel="seconds per million tokens",
    )
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


SUITES = {"D1": suite_d1, "COST": suite_cost}
