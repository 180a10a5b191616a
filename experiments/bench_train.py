# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""M1: the jitted train step of each phase (dense, warmup, sparse), one GPU, `impl="pallas"`.

  python -m experiments.bench --suite=M1 [--out=experiments/results/m1.json]
  M1_PRESETS=v32_attn,1b M1_LENGTHS=8192,32768,65536 M1_PHASES=dense,warmup,sparse \
    M1_PROFILE=32768 python -m experiments.bench --suite=M1

Each row: tokens/s, step ms, MFU against the card's dense bf16 peak, the compiled step's memory
(arguments + temporaries, from XLA's memory analysis), compile seconds, and as baseline the dense
phase of the same preset and length (ratio = tokens/s over the baseline's). Model FLOPs per token
(the formula is written into each row):
  dense   6·N + 3·A_dense                     A_dense  = 2·H·(d_qk + d_v)·(L+1)/2 per layer
  warmup  2·N + A_dense + 3·I_dense           I_dense  = 2·J·Dᵢ·(L+1)/2 (indexer logits, KL fwd+bwd)
  sparse  6·N + 3·A_sparse + I_dense + 3·I_sparse
          A_sparse = 2·H·(576 + 512)·min(k, L) (absorbed MQA), I_sparse = 2·J·Dᵢ·min(k, L)
N counts the parameters a token passes through (routed experts: the activated share only).
The dense target of the warm-up KL is not counted (a fused kernel would reuse the attention's
logits); so the warm-up MFU is a floor.
M1_GMM=kernels runs the MoE layers' grouped matmuls on the Pallas kernels (`shape.gmm`; default:
the library's choice) for MoE presets such as `v32_attn_moe`.
M1_SPARSE_KL=xla,kernels runs the sparse phase once per sparse indexer-KL path (the streamed XLA
custom_vjp or the Pallas-Triton kernels; `shape.sparse_kl`); unset, the library's default.
M1_REMAT_POLICY=full,save_attention,save_selection,save_projections runs every phase once per
ModelConfig.remat_policy (`shape.remat_policy`; the baseline is the first dense row); unset, the
preset's.
M1_LOSS_CHUNK=<tokens> computes the cross-entropy that many tokens at a time (TrainConfig.loss_chunk:
no [T, V] logits; `shape.loss_chunk`); unset, the whole logits at once.
M1_DENSE_KL=xla,kernels,kernels_3sweep,kernels_cudnn runs the warm-up once per dense-KL path
(`shape.dense_kl` names it); unset, the library's default (kernels). xla: the streamed XLA
custom_vjp; kernels: the Pallas-Triton kernels with the attention's lse from the Mosaic GPU flash
kernel (sparse_attention.warmup_attention) and kernel_kl_triton.GRAD_IN_FORWARD (one sweep gives
the KL value, dq, dw and dk after an indexer-only lse pass); kernels_3sweep: the same without
GRAD_IN_FORWARD (forward, dq and dk sweeps); kernels_cudnn: cuDNN attention, the KL kernels
computing the lse in a pass of their own.
With M1_PROFILE=<L>, one step per phase at that length is traced (jax.profiler, Perfetto JSON)
and the top GPU ops by time go to `<out dir>/m1_profile_<preset>_<phase>_<L>.md`.
"""

import json
import os
import re
import tempfile
import time

import jax
import numpy as np

from dsa_jax import config as config_lib
from dsa_jax import data, model, optim, sparse_attention
from dsa_jax import train as train_lib
from experiments import bench_common as bc
from pallas_kernels.grouped_matmul import ops as gmm_ops
from pallas_kernels.lightning_indexer import kernel_kl_triton
from pallas_kernels.lightning_indexer import ops as indexer_ops

PEAK_BF16 = {"H200": 989e12, "H100": 989e12}  # dense bf16 tensor-core peak (SXM)


def _peak(kind: str) -> float:
  for k, v in PEAK_BF16.items():
    if k in kind:
      return v
  return 989e12


def active_params(cfg: config_lib.ModelConfig) -> int:
  """Parameters per token: all, but only n_activated of the routed experts (embedding excluded,
  output head included)."""
  state = jax.tree_util.tree_leaves_with_path(model.abstract(cfg))
  total = 0
  for path, x in state:
    n = int(np.prod(x.shape))
    name = optim.path_str(path)
    if name.startswith(".embed") or name.startswith(".mtp"):  # a lookup; MTP is off in M1
      continue
    if re.search(r"\.ffn/\.w[123]/", name):  # routed experts [layers, E, ...]
      n = n * cfg.n_activated_experts // cfg.n_routed_experts
    total += n
  return total


def flops_per_token(cfg: config_lib.ModelConfig, phase: str, seq_len: int) -> tuple[float, str]:
  n = active_params(cfg)
  h, layers = cfg.n_heads, cfg.n_layers
  l, kk = seq_len, min(cfg.index_topk, seq_len)
  a_dense = layers * 2 * h * (cfg.qk_head_dim + cfg.v_head_dim) * (l + 1) / 2
  i_dense = layers * 2 * cfg.index_n_heads * cfg.index_head_dim * (l + 1) / 2
  a_sparse = layers * 2 * h * (cfg.latent_dim + cfg.kv_lora_rank) * kk
  i_sparse = layers * 2 * cfg.index_n_heads * cfg.index_head_dim * kk
  if phase == "dense":
    return 6 * n + 3 * a_dense, f"6*N + 3*A_dense (N={n})"
  if phase == "warmup":
    return 2 * n + a_dense + 3 * i_dense, f"2*N + A_dense + 3*I_dense (N={n})"
  return (
    6 * n + 3 * a_sparse + i_dense + 3 * i_sparse,
    f"6*N + 3*A_sparse + I_dense + 3*I_sparse (N={n}, k={kk})",
  )


def _trainer(preset: str, phase: str, seq_len: int, impl: str, remat_policy: str | None = None):
  kw = {"remat_policy": remat_policy} if remat_policy else {}
  mcfg = config_lib.preset(preset, impl=impl, max_seq_len=max(seq_len, 4096), **kw)
  cfg = train_lib.TrainConfig(
    model=mcfg,
    phase=train_lib.phase(phase),
    optim=optim.OptimConfig(lr=1e-4, warmup_steps=0, total_steps=100),
    data=data.DataConfig(source="text", seq_len=seq_len, batch_size=1),
    steps=100,
    progress=False,
    init="sharded",
    loss_chunk=_loss_chunk(),
  )
  return train_lib.Trainer(cfg), cfg


def _loss_chunk() -> int:
  return int(os.environ.get("M1_LOSS_CHUNK", "0") or 0)


def _profile_table(trace_dir: str, steps: int, top: int = 30) -> str:
  """Top GPU ops by time a step (bench_common.trace_op_times), as a markdown table."""
  got = bc.trace_op_times(trace_dir, steps, top)
  lines = ["| op | ms per step | calls per step | share |", "|---|---|---|---|"]
  for o in got["ops"]:
    lines.append(f"| `{o['name'][:90]}` | {o['ms']:.2f} | {o['calls']:g} | {o['share']:.1%} |")
  lines.append(f"| (all GPU ops) | {got['device_ms']:.2f} | | 100% |")
  return "\n".join(lines) + "\n"


def _one(preset, phase, seq_len, iters, profile_dir, impl, tag="", remat_policy=None):
  trainer, cfg = _trainer(preset, phase, seq_len, impl, remat_policy)
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (1, seq_len), dtype=np.int32)
  batch = trainer.put_batch({"tokens": tokens, "loss_mask": np.ones_like(tokens, np.float32)})
  t0 = time.perf_counter()
  compiled = trainer.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  mem_gib = None
  if mem is not None:
    mem_gib = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    ) / 2**30
  state, m = compiled(state, batch)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t) * 1e3)
  loss = float(m["loss"])
  table = None
  if profile_dir:
    with tempfile.TemporaryDirectory() as d:
      with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(2):
          state, m = compiled(state, batch)
        jax.block_until_ready(m)
      table = _profile_table(d, 2)
    path = os.path.join(profile_dir, f"m1_profile_{preset}_{phase}{tag}_{seq_len}.md")
    with open(path, "w") as f:
      f.write(f"# M1 profile: {preset}, {phase}, L={seq_len}, {jax.devices()[0].device_kind}\n\n")
      f.write(f"commit {bc.commit()}, step {np.median(times):.1f} ms (timed run)\n\n{table}")
  del state, batch, compiled
  return float(np.median(times)), compile_s, mem_gib, loss


def suite_m1(small: bool):
  env = lambda k, d: [x for x in os.environ.get(k, d).split(",") if x]
  if small:
    presets, lengths, phases, iters = ["test"], [128], ["dense", "warmup", "sparse"], 2
  else:
    presets = env("M1_PRESETS", "v32_attn,1b")
    lengths = [int(x) for x in env("M1_LENGTHS", "8192,32768,65536")]
    phases = env("M1_PHASES", "dense,warmup,sparse")
    iters = int(os.environ.get("M1_ITERS", "5"))
  gmm_mode = os.environ.get("M1_GMM", "")
  if gmm_mode not in ("", "ragged_dot", "kernels"):
    raise ValueError(f"M1_GMM={gmm_mode!r}; expected ragged_dot or kernels")
  if gmm_mode:
    gmm_ops.GMM_KERNELS_BY_DEFAULT = gmm_mode == "kernels"
  kl_modes = env("M1_DENSE_KL", "")
  modes = {"xla", "kernels", "kernels_3sweep", "kernels_cudnn"}
  if set(kl_modes) - modes:
    raise ValueError(f"M1_DENSE_KL={kl_modes}; expected a comma list of {sorted(modes)}")
  sparse_modes = env("M1_SPARSE_KL", "")
  if set(sparse_modes) - {"xla", "kernels"}:
    raise ValueError(f"M1_SPARSE_KL={sparse_modes}; expected a comma list of xla, kernels")
  policies = env("M1_REMAT_POLICY", "") or [None]
  prof_len = int(os.environ.get("M1_PROFILE", "0") or 0)
  prof_dir = os.environ.get("M1_PROFILE_DIR", "experiments/results")
  kind = jax.devices()[0].device_kind
  impl = "reference" if small else "pallas"  # the test preset's indexer is too small for Pallas
  rows = []
  for preset in presets:
    mcfg = config_lib.preset(preset)
    for l in lengths:
      base = None
      runs = []
      for ph in phases:
        modes = {"warmup": kl_modes, "sparse": sparse_modes}.get(ph) or [None]
        runs += [(ph, m, r) for m in modes for r in policies]
      for ph, kl_mode, policy in runs:
        shape = {"preset": preset, "heads": mcfg.n_heads, "seq_len": l, "phase": ph}
        if _loss_chunk():
          shape["loss_chunk"] = _loss_chunk()
        if policy is not None:
          shape["remat_policy"] = policy
        if gmm_mode and mcfg.n_layers > mcfg.n_dense_layers:
          shape["gmm"] = gmm_mode
        if kl_mode is not None and ph == "sparse":
          shape["sparse_kl"] = kl_mode
          indexer_ops.SPARSE_KL_KERNELS_BY_DEFAULT = kl_mode != "xla"
        elif kl_mode is not None:
          shape["dense_kl"] = kl_mode
          indexer_ops.DENSE_KL_KERNELS_BY_DEFAULT = kl_mode != "xla"
          sparse_attention.GPU_WARMUP_ATTENTION_KERNEL = kl_mode != "kernels_cudnn"
          kernel_kl_triton.GRAD_IN_FORWARD = kl_mode != "kernels_3sweep"
        try:
          ms, comp_s, mem_gib, loss = _one(
            preset,
            ph,
            l,
            iters,
            prof_dir if l == prof_len else None,
            impl,
            "".join(f"_{m}" for m in (kl_mode, policy) if m),
            policy,
          )
        except Exception as e:  # noqa: BLE001 - record what did not fit, go on
          rows.append(
            bc.row("M1", shape, float("nan"), None, error=f"{type(e).__name__}: {e}"[:400])
          )
          print(json.dumps(rows[-1]), flush=True)
          jax.clear_caches()
          continue
        fpt, formula = flops_per_token(mcfg, ph, l)
        tps = l / (ms * 1e-3)
        extra = dict(
          tokens_per_s=tps,
          mfu=fpt * tps / _peak(kind),
          flops_per_token=fpt,
          flop_formula=formula,
          peak_mem_gib=mem_gib,
          compile_s=comp_s,
          loss=loss,
        )
        if ph == "dense" and base is None:  # the first dense row (its policy) is the baseline
          base = {"name": f"dense phase, {preset}, L={l}", "time_ms": ms, "tokens_per_s": tps}
          if policy is not None:
            base["remat_policy"] = policy
        elif base is not None:
          extra["baseline"] = base
        rows.append(bc.row("M1", shape, ms, fpt * l, **extra))
        print(json.dumps(rows[-1]), flush=True)
        jax.clear_caches()
  return rows


SUITES = {"M1": suite_m1}
