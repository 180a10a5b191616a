# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""Scaling of the sparse-phase train step over 1, 2, 4 GPUs: tokens/s and MFU per mesh layout.

  python -m experiments.bench_scaling                  # 1b preset, every GPU count <= local GPUs
  python -m experiments.bench_scaling --small          # CPU smoke test (test preset, 8 fake devices)

Weak scaling: the global batch is batch_per_device x devices. Layouts per device count n:
data (n), fsdp (n), fsdp x tensor (n/2 x 2), expert (n, tokens also split over it). MFU counts
6·(active matmul params) + the sparse attention and indexer FLOPs per token (formula in the JSON)
against the bf16 dense peak. Writes experiments/results/scaling.json.
"""

import json
import math
import os
import sys
import time

from absl import app, flags

_SMALL = flags.DEFINE_bool("small", False, "CPU smoke test: test preset, 8 fake CPU devices")
_GPUS = flags.DEFINE_list("devices", ["1", "2", "4"], "device counts to run (those available)")
_SEQ = flags.DEFINE_integer("seq_len", 8192, "sequence length (1b preset)")
_BPD = flags.DEFINE_integer("batch_per_device", 1, "sequences per device (weak scaling)")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps (after 2 warm-up steps)")
_IMPL = flags.DEFINE_string("impl", "reference", "kernel impl: reference | pallas")
_LAYOUTS = flags.DEFINE_list("layouts", ["data", "fsdp", "fsdp_tensor", "expert"], "layouts")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "per-device dense bf16 peak (H200 SXM: 989)")
_OUT = flags.DEFINE_string(
  "out", None, "result file (default experiments/results/scaling.json; --small: /tmp/...)"
)


def _layout(name: str, n: int) -> dict | None:
  if name == "data":
    return {"data": n}
  if name == "fsdp":
    return {"fsdp": n}
  if name == "fsdp_tensor":
    return {"fsdp": n // 2, "tensor": 2} if n >= 2 else None
  if name == "expert":
    return {"expert": n}
  raise ValueError(f"unknown layout {name!r}")


def model_flops_per_token(mc, seq_len: int) -> dict:
  """Training FLOPs per token: 6·N_active (fwd+bwd matmuls) + attention + indexer."""
  from flax import nnx

  from dsa_jax import model

  st = nnx.state(model.abstract(mc))
  active = 0.0
  for path, var in nnx.to_flat_state(st):
    p = "/".join(map(str, path))
    n = math.prod(var.get_value().shape)
    if p == "embed" or p.startswith("mtp/") or "gate_bias" in p:
      continue  # lookup, unused MTP module, not a matmul
    if p.startswith("moe_layers/ffn/w"):
      n *= mc.n_activated_experts / mc.n_routed_experts
    active += n
  k_eff = min(mc.index_topk, (seq_len + 1) / 2)  # mean selected keys under the causal limit
  attn = 2 * mc.n_heads * k_eff * (mc.latent_dim + mc.kv_lora_rank)  # q·k and p·v, per layer
  indexer = 2 * mc.index_n_heads * mc.index_head_dim * (seq_len + 1) / 2  # scores vs past keys
  per_layer = 3 * attn + indexer + 2 * 2 * mc.index_n_heads * mc.index_head_dim * k_eff
  total = 6 * active + mc.n_layers * per_layer
  return {
    "active_params": active,
    "flops_per_token": total,
    "formula": "6*active + L*(3*2*H*k*(576+512) + 2*J*Di*T/2 + 4*J*Di*k)",
  }


def run_one(mc, layout: dict, n: int, seq_len: int, bpd: int, steps: int):
  import jax

  from dsa_jax import data, optim, sharding, train

  cfg = train.TrainConfig(
    model=mc,
    phase=train.phase("sparse"),
    optim=optim.OptimConfig(lr=1e-4, warmup_steps=1, total_steps=100),
    data=data.DataConfig(source="text", seq_len=seq_len, batch_size=bpd * n),
    mesh=tuple(layout.items()),
    init="sharded",
    progress=False,
  )
  tr = train.Trainer(cfg, mesh=sharding.make_mesh(layout, jax.devices()[:n]))
  state = tr.init_state()
  batch = tr.put_batch(data.batch(cfg.data, 0))
  t0 = time.perf_counter()
  state, m = tr.train_step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for _ in range(1):
    state, m = tr.train_step(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = tr.train_step(state, batch)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / steps
  return {"step_s": dt, "compile_s": compile_s, "loss": float(m["loss"])}


def main(argv):
  del argv
  if _SMALL.value:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  import dsa_jax
  from experiments import bench_common

  if _SMALL.value:
    mc = dsa_jax.preset("test", impl=_IMPL.value, attn_block_q=32)
    seq, peak = 64, None
  else:
    mc = dsa_jax.preset("1b", impl=_IMPL.value)
    seq, peak = _SEQ.value, _PEAK.value
  fl = model_flops_per_token(mc, seq)
  avail = len(jax.devices())
  rows = []
  for n in sorted({int(x) for x in _GPUS.value}):
    if n > avail:
      print(f"skip {n} devices: only {avail} available", file=sys.stderr)
      continue
    for name in _LAYOUTS.value:
      layout = _layout(name, n)
      if layout is None or (n == 1 and name != "data"):
        continue  # one device: every layout is the same program
      r = run_one(mc, layout, n, seq, _BPD.value, _STEPS.value)
      tok_s = _BPD.value * n * seq / r["step_s"]
      row = {
        "devices": n,
        "layout": layout,
        "name": name if n > 1 else "single",
        "tokens_per_s": tok_s,
        "tokens_per_s_per_device": tok_s / n,
        "mfu": (fl["flops_per_token"] * tok_s / (n * peak * 1e12)) if peak else None,
        **r,
      }
      print(json.dumps(row), flush=True)
      rows.append(row)
  out = {
    "suite": "scaling",
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "commit": bench_common.commit(),
    "command": bench_common.command("experiments.bench_scaling"),
    "preset": "test" if _SMALL.value else "1b",
    "seq_len": seq,
    "batch_per_device": _BPD.value,
    "impl": _IMPL.value,
    "peak_tflops": peak,
    **fl,
    "rows": rows,
  }
  path = _OUT.value or (
    "/tmp/scaling_small.json" if _SMALL.value else "experiments/results/scaling.json"
  )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
