# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""ModelConfig: every field of the DeepSeek-V3.2-Exp config plus our run knobs (docs/dsa.md).

Field names follow DeepSeek's reference `ModelArgs` (inference/model.py). The config is a frozen,
hashable dataclass so it can be a static jit argument. Every invalid value raises `ValueError`
naming the field, the value and the rule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

_DTYPES = ("float32", "bfloat16")
# Fields of older records (model_config.json, convert.json) that nothing read: dropped on load.
# score_func was always "sigmoid"; dtype named the HF checkpoint's weight format (the converter
# reads it from the safetensors); max_batch_size was never used.
REMOVED_FIELDS = ("score_func", "dtype", "max_batch_size")
_INDEXER_DTYPES = ("fp8", "bfloat16", "float32")
_IMPLS = ("reference", "pallas")
_REMAT_POLICIES = ("full", "save_attention", "save_selection", "save_projections")


def _err(field: str, value: Any, rule: str) -> ValueError:
  return ValueError(f"ModelConfig.{field}={value!r} is invalid: {rule}")


def read_hf_config(path_or_dict: str | os.PathLike | dict) -> dict:
  """An HF `config.json` as a dict: a dict (copied), the file, or a directory holding it."""
  if isinstance(path_or_dict, dict):
    return dict(path_or_dict)
  p = os.fspath(path_or_dict)
  if os.path.isdir(p):
    p = os.path.join(p, "config.json")
  try:
    with open(p) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ValueError(f"HF config not found: {p}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"HF config {p} is not valid JSON: {e}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """DeepSeek-V3.2-Exp architecture (docs/dsa.md §Notation) and this implementation's knobs."""

  # Sizes (DeepSeek's reference names).
  vocab_size: int = 129280
  dim: int = 7168
  inter_dim: int = 18432
  moe_inter_dim: int = 2048
  n_layers: int = 61
  n_dense_layers: int = 3
  n_heads: int = 128
  # MoE (docs/dsa.md §Model).
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  n_activated_experts: int = 8
  n_expert_groups: int = 8
  n_limited_groups: int = 4
  route_scale: float = 2.5  # routing is sigmoid scores (DeepSeek's score_func="sigmoid")
  # MLA (docs/dsa.md §MLA).
  q_lora_rank: int = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  # FP8 (docs/dsa.md §FP8 formats): activation scale rounding (the FP8 indexer and caches).
  scale_fmt: str | None = "ue8m0"
  # Lightning indexer (docs/dsa.md §Indexer).
  index_n_heads: int = 64
  index_head_dim: int = 128
  index_topk: int = 2048
  # RoPE / YaRN (docs/dsa.md §RoPE and YaRN).
  original_seq_len: int = 4096
  rope_theta: float = 10000.0
  rope_factor: float = 40.0
  beta_fast: int = 32
  beta_slow: int = 1
  mscale: float = 1.0
  max_seq_len: int = 16384
  norm_eps: float = 1e-6
  # MTP (HF num_nextn_predict_layers).
  n_mtp_layers: int = 1
  # --- implementation knobs (not in DeepSeek's config) ---
  param_dtype: str = "float32"  # storage dtype of the parameters
  compute_dtype: str = "bfloat16"  # activation / matmul dtype
  indexer_dtype: str = "fp8"  # "fp8": Hadamard + e4m3 1x128 quant-dequant (docs/dsa.md); else plain
  impl: str = "reference"  # kernel dispatch: "reference" (pure JAX) | "pallas"
  attn_block_q: int = 512  # query block of the chunked reference attention / indexer
  remat: bool = False  # jax.checkpoint each scanned block
  # What a remat block keeps for its backward: "full" nothing (the backward reruns the whole
  # block); "save_attention" the attention kernels' outputs and residuals, the top-k ids and the
  # KL target (the sparse_attention.SAVED and SAVED_OUT names), so the backward reruns only
  # projections and FFN; "save_selection" all of these but the sparse attention outputs (the
  # largest), so the backward reruns the sparse attention forward but not the indexer, top-k,
  # KL target or KL forward: for lengths where "save_attention" does not fit; "save_projections"
  # what "save_attention" keeps plus every projection's output (the SAVED_PROJ name), so the
  # backward replays no matmul: the most memory, the least replay.
  remat_policy: str = "full"
  # Expert parallelism (expert_parallel.py): 0 = dropless; f > 0 = f·n·k/ep slots per shard pair.
  moe_capacity_factor: float = 0.0
  init_std: float = 0.006  # DeepSeek-V3 init std

  def __post_init__(self):
    pos_int = (
      "vocab_size dim inter_dim moe_inter_dim n_layers n_heads q_lora_rank kv_lora_rank "
      "qk_nope_head_dim qk_rope_head_dim v_head_dim index_n_heads index_head_dim index_topk "
      "original_seq_len max_seq_len attn_block_q"
    ).split()
    for f in pos_int:
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise _err(f, v, "must be a positive int")
    nonneg_int = "n_dense_layers n_routed_experts n_shared_experts n_mtp_layers".split()
    for f in nonneg_int:
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _err(f, v, "must be a non-negative int")
    for f in ("route_scale", "rope_theta", "rope_factor", "mscale", "norm_eps", "init_std"):
      v = getattr(self, f)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        raise _err(f, v, "must be a positive number")
    if not isinstance(self.moe_capacity_factor, (int, float)) or self.moe_capacity_factor < 0:
      raise _err("moe_capacity_factor", self.moe_capacity_factor, "must be a number >= 0")
    if self.n_dense_layers > self.n_layers:
      raise _err("n_dense_layers", self.n_dense_layers, f"must be <= n_layers={self.n_layers}")
    if self.n_mtp_layers > 1:
      raise _err(
        "n_mtp_layers", self.n_mtp_layers, "only 0 or 1 MTP module is supported (V3.2 has 1)"
      )
    if self.n_layers > self.n_dense_layers:  # there are MoE layers
      if self.n_routed_experts <= 0:
        raise _err(
          "n_routed_experts", self.n_routed_experts, "must be > 0 when there are MoE layers"
        )
      if not 0 < self.n_activated_experts <= self.n_routed_experts:
        raise _err(
          "n_activated_experts",
          self.n_activated_experts,
          f"must be in [1, n_routed_experts={self.n_routed_experts}]",
        )
      if self.n_expert_groups <= 0 or self.n_routed_experts % self.n_expert_groups:
        raise _err(
          "n_expert_groups",
          self.n_expert_groups,
          f"must be > 0 and divide n_routed_experts={self.n_routed_experts}",
        )
      if not 0 < self.n_limited_groups <= self.n_expert_groups:
        raise _err(
          "n_limited_groups",
          self.n_limited_groups,
          f"must be in [1, n_expert_groups={self.n_expert_groups}]",
        )
      per_group = self.n_routed_experts // self.n_expert_groups
      if self.n_expert_groups > 1 and per_group < 2:
        raise _err(
          "n_expert_groups", self.n_expert_groups, "group scores sum the top-2 experts of a group"
        )
      if self.n_limited_groups * per_group < self.n_activated_experts:
        raise _err(
          "n_limited_groups",
          self.n_limited_groups,
          f"kept groups hold {self.n_limited_groups * per_group} experts, fewer than "
          f"n_activated_experts={self.n_activated_experts}",
        )
    if self.scale_fmt not in (None, "ue8m0"):
      raise _err("scale_fmt", self.scale_fmt, "must be None or 'ue8m0'")
    if self.qk_rope_head_dim % 2:
      raise _err("qk_rope_head_dim", self.qk_rope_head_dim, "must be even (RoPE rotates pairs)")
    if self.index_head_dim & (self.index_head_dim - 1):
      raise _err("index_head_dim", self.index_head_dim, "must be a power of two (Hadamard)")
    if self.qk_rope_head_dim > self.index_head_dim:
      raise _err(
        "qk_rope_head_dim",
        self.qk_rope_head_dim,
        f"must be <= index_head_dim={self.index_head_dim} (indexer rope part comes first)",
      )
    if self.beta_fast <= self.beta_slow:
      raise _err("beta_fast", self.beta_fast, f"must be > beta_slow={self.beta_slow}")
    for f, allowed in (
      ("param_dtype", _DTYPES),
      ("compute_dtype", _DTYPES),
      ("indexer_dtype", _INDEXER_DTYPES),
      ("impl", _IMPLS),
      ("remat_policy", _REMAT_POLICIES),
    ):
      if getattr(self, f) not in allowed:
        raise _err(f, getattr(self, f), f"must be one of {allowed}")

  # Derived sizes (docs/dsa.md §MLA).
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def latent_dim(self) -> int:
    """MQA-mode key dim: kv_lora_rank + qk_rope_head_dim (576 for V3.2)."""
    return self.kv_lora_rank + self.qk_rope_head_dim

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers - self.n_dense_layers

  @property
  def yarn_active(self) -> bool:
    return self.max_seq_len > self.original_seq_len

  @property
  def softmax_scale(self) -> float:
    """MLA softmax scale with the YaRN mscale correction: 0.13523378 for V3.2 (docs/dsa.md §MLA)."""
    scale = self.qk_head_dim**-0.5
    if self.yarn_active:
      m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
      scale = scale * m * m
    return scale

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    """From `to_dict()` output, e.g. a workdir's model_config.json (the removed fields
    `REMOVED_FIELDS` of older records are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in d.items() if k not in REMOVED_FIELDS}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown ModelConfig field(s) {unknown}; known: {sorted(names)}")
    return cls(**d)

  @classmethod
  def from_hf_config(cls, path_or_dict: str | os.PathLike | dict, **overrides) -> "ModelConfig":
    """Reads a DeepSeek-V3.2(-Exp) HF `config.json`; rejects what it cannot represent.

    See docs/dsa.md §Checkpoints.
    """
    hf = read_hf_config(path_or_dict)
    missing = [k for k in _HF_SHAPE_KEYS if k not in hf and _HF_MAP[k] not in overrides]
    if missing:  # the dataclass defaults are the 671B model's: never a silent fill-in
      raise ValueError(f"HF config is missing required key(s) {missing}")
    return cls(**{**_hf_to_fields(hf), **overrides})


# HF keys that set parameter shapes: a config.json without one of them is rejected.
_HF_SHAPE_KEYS = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "moe_intermediate_size",
  "num_hidden_layers",
  "first_k_dense_replace",
  "num_attention_heads",
  "n_routed_experts",
  "num_experts_per_tok",
  "q_lora_rank",
  "kv_lora_rank",
  "qk_nope_head_dim",
  "qk_rope_head_dim",
  "v_head_dim",
)


# HF key -> ModelConfig field.
_HF_MAP = {
  "vocab_size": "vocab_size",
  "hidden_size": "dim",
  "intermediate_size": "inter_dim",
  "moe_intermediate_size": "moe_inter_dim",
  "num_hidden_layers": "n_layers",
  "first_k_dense_replace": "n_dense_layers",
  "num_attention_heads": "n_heads",
  "n_routed_experts": "n_routed_experts",
  "n_shared_experts": "n_shared_experts",
  "num_experts_per_tok": "n_activated_experts",
  "n_group": "n_expert_groups",
  "topk_group": "n_limited_groups",
  "routed_scaling_factor": "route_scale",
  "q_lora_rank": "q_lora_rank",
  "kv_lora_rank": "kv_lora_rank",
  "qk_nope_head_dim": "qk_nope_head_dim",
  "qk_rope_head_dim": "qk_rope_head_dim",
  "v_head_dim": "v_head_dim",
  "index_n_heads": "index_n_heads",
  "index_head_dim": "index_head_dim",
  "index_topk": "index_topk",
  "max_position_embeddings": "max_seq_len",
  "rope_theta": "rope_theta",
  "rms_norm_eps": "norm_eps",
  "num_nextn_predict_layers": "n_mtp_layers",
  "initializer_range": "init_std",
}
# Keys whose value must be exactly this for the architecture we implement.
_HF_REQUIRED = {
  "topk_method": "noaux_tc",
  "scoring_func": "sigmoid",
  "hidden_act": "silu",
  "moe_layer_freq": 1,
  "tie_word_embeddings": False,
  "attention_bias": False,
  "norm_topk_prob": True,
}
# Generic HF / tokenizer / serving keys that do not change the math.
_HF_IGNORED = set(
  "architectures model_type transformers_version torch_dtype dtype bos_token_id eos_token_id "
  "pad_token_id use_cache auto_map attention_dropout pretraining_tp ep_size output_attentions "
  "output_hidden_states return_dict num_key_value_heads rope_interleave _name_or_path "
  "quantization_config aux_loss_alpha seq_aux id2label label2id tokenizer_class "
  "chunk_size_feed_forward is_encoder_decoder problem_type torchscript "
  "use_return_dict rope_parameters rope_scaling index_topk_freq".split()
)


def _hf_derived_keys(hf: dict) -> dict:
  """Checks and drops the derived keys transformers v5 writes (head_dim, layer types, ...)."""
  hf = dict(hf)
  rope, nope = hf.get("qk_rope_head_dim", 64), hf.get("qk_nope_head_dim", 128)
  checks = {
    "head_dim": lambda v: v == rope,
    "qk_head_dim": lambda v: v == nope + rope,
    "mlp_bias": lambda v: v is False,
    "layer_types": lambda v: len(set(v)) <= 1,
    "mlp_layer_types": lambda v: (
      list(v)
      == ["dense"] * hf.get("first_k_dense_replace", 0)
      + ["sparse"] * (len(v) - hf.get("first_k_dense_replace", 0))
    ),
    "output_router_logits": lambda v: True,
    "num_local_experts": lambda v: v == hf.get("n_routed_experts", v),
  }
  mt = hf.get("model_type", "deepseek_v32")
  if mt not in ("deepseek_v32", "deepseek_v3"):
    raise ValueError(f"HF config model_type={mt!r}: expected 'deepseek_v32' or 'deepseek_v3'")
  for k, ok in checks.items():
    if k in hf:
      v = hf.pop(k)
      if not ok(v):
        raise ValueError(f"HF config key {k!r}={v!r} cannot be represented by dsa-jax")
  return hf


def _hf_to_fields(hf: dict) -> dict:
  hf = _hf_derived_keys(hf)
  out: dict[str, Any] = {}
  # transformers' DeepseekV32Config has no MTP key and never runs layer n_layers: no key, no MTP.
  out["n_mtp_layers"] = 0
  for k, v in hf.items():
    if k in _HF_MAP:
      out[_HF_MAP[k]] = v
    elif k in _HF_REQUIRED:
      if v != _HF_REQUIRED[k]:
        raise ValueError(
          f"HF config key {k!r}={v!r} cannot be represented: dsa-jax implements {k}="
          f"{_HF_REQUIRED[k]!r} (DeepSeek-V3.2 architecture)"
        )
    elif k not in _HF_IGNORED:
      raise ValueError(f"HF config key {k!r} (value {v!r}) is not understood by dsa-jax")
  if hf.get("q_lora_rank") is None and "q_lora_rank" in hf:
    raise ValueError("HF config key 'q_lora_rank'=None cannot be represented: the indexer reads qr")
  nkv = hf.get("num_key_value_heads")
  if nkv is not None and nkv != hf.get("num_attention_heads", nkv):
    raise ValueError(f"HF config key 'num_key_value_heads'={nkv} must equal num_attention_heads")
  if hf.get("rope_interleave", True) is not True:
    raise ValueError(
      "HF config key 'rope_interleave'=False cannot be represented: MLA is interleaved"
    )
  rope = hf.get("rope_scaling") or hf.get("rope_parameters")
  if isinstance(rope, dict):
    if "rope_theta" in rope:
      out["rope_theta"] = rope["rope_theta"]
    rtype = rope.get("type", rope.get("rope_type"))
    if rtype == "yarn":
      for hk, f in (
        ("factor", "rope_factor"),
        ("original_max_position_embeddings", "original_seq_len"),
        ("beta_fast", "beta_fast"),
        ("beta_slow", "beta_slow"),
        ("mscale_all_dim", "mscale"),
      ):
        if hk in rope:
          out[f] = rope[hk]
      if rope.get("mscale", 1.0) != rope.get("mscale_all_dim", 1.0):
        raise ValueError(
          f"HF config key 'rope_scaling.mscale'={rope.get('mscale')} != mscale_all_dim: the YaRN "
          "attention factor mscale/mscale_all_dim must be 1"
        )
    elif rtype in (None, "default"):
      out["max_seq_len"] = min(out.get("max_seq_len", 4096), out.get("original_seq_len", 4096))
    else:
      raise ValueError(f"HF config key 'rope_scaling.type'={rtype!r} cannot be represented (yarn)")
  elif rope is not None:
    raise ValueError(f"HF config key 'rope_scaling'={rope!r} must be a dict or null")
  else:
    # No scaling: keep YaRN off by making max_seq_len == original_seq_len.
    out.setdefault("max_seq_len", 4096)
    out["original_seq_len"] = out["max_seq_len"]
  for f in ("rope_factor", "beta_fast", "beta_slow", "mscale", "rope_theta", "route_scale"):
    if f in out and isinstance(out[f], int) and f in ("rope_factor", "mscale", "rope_theta"):
      out[f] = float(out[f])
  q = hf.get("quantization_config")
  if q is not None:
    if q.get("quant_method") != "fp8" or list(q.get("weight_block_size", [128, 128])) != [128, 128]:
      raise ValueError(f"HF config key 'quantization_config'={q!r}: only fp8 128x128 blocks")
    out["scale_fmt"] = q.get("scale_fmt")
  return out


# FP8 weight blocks of DeepSeek's checkpoints (convert/fp8.py quantises with the same size).
FP8_BLOCK = 128


def hf_config_dict(cfg: ModelConfig, fp8_export: bool = False, torch_dtype="bfloat16") -> dict:
  """An HF `DeepseekV32ForCausalLM` config.json for cfg (used when no source config was kept)."""
  hf = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.dim,
    "intermediate_size": cfg.inter_dim,
    "moe_intermediate_size": cfg.moe_inter_dim,
    "num_hidden_layers": cfg.n_layers,
    "first_k_dense_replace": cfg.n_dense_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_heads,
    "n_routed_experts": cfg.n_routed_experts,
    "n_shared_experts": cfg.n_shared_experts,
    "num_experts_per_tok": cfg.n_activated_experts,
    "n_group": cfg.n_expert_groups,
    "topk_group": cfg.n_limited_groups,
    "routed_scaling_factor": cfg.route_scale,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "moe_layer_freq": 1,
    "q_lora_rank": cfg.q_lora_rank,
    "kv_lora_rank": cfg.kv_lora_rank,
    "qk_nope_head_dim": cfg.qk_nope_head_dim,
    "qk_rope_head_dim": cfg.qk_rope_head_dim,
    "v_head_dim": cfg.v_head_dim,
    "index_n_heads": cfg.index_n_heads,
    "index_head_dim": cfg.index_head_dim,
    "index_topk": cfg.index_topk,
    "num_nextn_predict_layers": cfg.n_mtp_layers,
    "max_position_embeddings": cfg.max_seq_len,
    "rope_theta": cfg.rope_theta,
    "rms_norm_eps": cfg.norm_eps,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "initializer_range": cfg.init_std,
    "torch_dtype": torch_dtype,
  }
  if cfg.yarn_active:
    hf["rope_scaling"] = {
      "type": "yarn",
      "factor": cfg.rope_factor,
      "original_max_position_embeddings": cfg.original_seq_len,
      "beta_fast": cfg.beta_fast,
      "beta_slow": cfg.beta_slow,
      "mscale": cfg.mscale,
      "mscale_all_dim": cfg.mscale,
    }
  else:
    hf["rope_scaling"] = None
  if fp8_export:
    hf["quantization_config"] = fp8_quantization_config(cfg.scale_fmt)
  return hf


def fp8_quantization_config(scale_fmt: str | None) -> dict:
  """HF `quantization_config` of an FP8 export (e4m3 weights in 128x128 blocks)."""
  q = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
  }
  if scale_fmt:
    q["scale_fmt"] = scale_fmt
  return q


# v32_attn's fields (see PRESETS): V3.2's attention in 2 dense-FFN layers for the M1 bench.
_V32_ATTN = dict(
  vocab_size=32768,
  inter_dim=4096,
  n_layers=2,
  n_dense_layers=2,
  max_seq_len=131072,
  n_mtp_layers=0,
  param_dtype="float32",
  compute_dtype="bfloat16",
  attn_block_q=256,
  remat=True,
  # the attention and KL kernels' forwards run once per step, not again in the remat replay
  remat_policy="save_attention",
)

PRESETS: dict[str, dict[str, Any]] = {
  # CPU unit tests: seconds. 1 dense + 2 MoE layers, every code path present.
  "test": dict(
    vocab_size=256,
    dim=64,
    inter_dim=128,
    moe_inter_dim=32,
    n_layers=3,
    n_dense_layers=1,
    n_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    n_activated_experts=2,
    n_expert_groups=4,
    n_limited_groups=2,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    index_n_heads=4,
    index_head_dim=32,
    index_topk=16,
    original_seq_len=64,
    max_seq_len=256,
    param_dtype="float32",
    compute_dtype="float32",
    attn_block_q=32,
    init_std=0.02,
  ),
  # CPU demo / debugging: a couple of minutes of training on 2 cores at L=1024.
  "debug": dict(
    vocab_size=256,
    dim=128,
    inter_dim=384,
    moe_inter_dim=64,
    n_layers=4,
    n_dense_layers=1,
    n_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    n_activated_experts=2,
    n_expert_groups=4,
    n_limited_groups=2,
    q_lora_rank=64,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    index_n_heads=4,
    index_head_dim=64,
    index_topk=128,
    original_seq_len=1024,
    max_seq_len=4096,
    param_dtype="float32",
    compute_dtype="float32",
    attn_block_q=256,
    init_std=0.02,
  ),
  # ~1B total parameters for one H200 at 32K context; real MLA/indexer head shapes (576/512, 64x128)
  # so the Pallas kernels run at their production shapes.
  "1b": dict(
    vocab_size=32768,
    dim=1536,
    inter_dim=6144,
    moe_inter_dim=768,
    n_layers=12,
    n_dense_layers=1,
    n_heads=16,
    n_routed_experts=16,
    n_shared_experts=1,
    n_activated_experts=2,
    n_expert_groups=4,
    n_limited_groups=2,
    q_lora_rank=768,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    index_n_heads=64,
    index_head_dim=128,
    index_topk=2048,
    original_seq_len=4096,
    max_seq_len=32768,
    rope_factor=8.0,
    param_dtype="float32",
    compute_dtype="bfloat16",
    attn_block_q=1024,
    remat=True,
  ),
  # V3.2's attention exactly (128 heads, MLA 1536/512/128/64/128, indexer 64x128, top-k 2048,
  # dim 7168) in 2 dense-FFN layers, so a training step fits one GPU at long context (the M1
  # bench). No MoE (v32_attn_moe has one): XLA's GPU ragged_dot materialises [E, tokens·k, D].
  "v32_attn": _V32_ATTN,
  # v32_attn with its second layer MoE (8 routed experts, top-2, 1 shared; V3.2's expert size):
  # the M1 rows of the MoE dispatch (grouped-matmul kernels vs ragged_dot, M1_GMM).
  "v32_attn_moe": dict(
    _V32_ATTN,
    n_dense_layers=1,
    n_routed_experts=8,
    n_activated_experts=2,
    n_expert_groups=1,
    n_limited_groups=1,
    n_shared_experts=1,
  ),
  # Exactly DeepSeek-V3.2-Exp (config_671B_v3.2.json + ModelArgs defaults; HF max positions).
  "v32_671b": dict(max_seq_len=163840, param_dtype="bfloat16", compute_dtype="bfloat16"),
  # --- the experiments' sizes (one table for every model size) ---
  # `python -m experiments.demo` (README's main command): 2 layers at L=1024, top-k = L/8, one
  # query block per sequence (fastest to compile and run on CPU at this size).
  "demo": dict(
    vocab_size=256,
    dim=64,
    inter_dim=192,
    moe_inter_dim=32,
    n_layers=2,
    n_dense_layers=1,
    n_heads=2,
    n_routed_experts=8,
    n_shared_experts=1,
    n_activated_experts=2,
    n_expert_groups=4,
    n_limited_groups=2,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    index_n_heads=4,
    index_head_dim=32,
    index_topk=128,
    original_seq_len=1024,
    max_seq_len=1024,
    param_dtype="float32",
    compute_dtype="float32",
    attn_block_q=1024,
    init_std=0.02,
  ),
  # The small-scale reproduction (experiments/reproduce.py, configs/reproduce.py:size=h200): a
  # V3.2-shaped model (MLA 16 heads, 64x128 FP8 indexer, MoE) at L=16384, top-k 2048 = L/8.
  "repro_h200": dict(
    vocab_size=256,
    dim=512,
    inter_dim=1536,
    moe_inter_dim=256,
    n_layers=6,
    n_dense_layers=1,
    n_heads=16,
    n_routed_experts=8,
    n_shared_experts=1,
    n_activated_experts=2,
    n_expert_groups=4,
    n_limited_groups=2,
    q_lora_rank=256,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    index_n_heads=64,
    index_head_dim=128,
    index_topk=2048,
    original_seq_len=16384,
    max_seq_len=16384,
    param_dtype="float32",
    compute_dtype="bfloat16",
    attn_block_q=1024,
    remat=True,
    impl="pallas",
  ),
  # The same pipeline on CPU at L=512 (configs/reproduce.py:size=cpu, its test).
  "repro_cpu": dict(
    vocab_size=256,
    dim=64,
    inter_dim=192,
    moe_inter_dim=32,
    n_layers=2,
    n_dense_layers=1,
    n_heads=2,
    n_routed_experts=4,
    n_shared_experts=1,
    n_activated_experts=2,
    n_expert_groups=2,
    n_limited_groups=1,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    index_n_heads=4,
    index_head_dim=32,
    index_topk=64,
    original_seq_len=512,
    max_seq_len=512,
    param_dtype="float32",
    compute_dtype="float32",
    attn_block_q=512,
    remat=False,
    impl="reference",
  ),
}
# The walkthrough notebook (experiments/notebooks): `debug` at L=512, top-k 64; and its CI size,
# `test` with two dense-FFN layers (quickest to compile) at L=64, top-k 16.
PRESETS["walkthrough"] = dict(
  PRESETS["debug"], index_topk=64, attn_block_q=512, max_seq_len=512, original_seq_len=512
)
PRESETS["walkthrough_tiny"] = dict(
  PRESETS["test"], n_layers=2, n_dense_layers=2, index_topk=16, attn_block_q=64
)
# The retrieval experiment (experiments/retrieval.py): a 2-layer MLA model with the 64x128 FP8
# indexer at L=8192, top-k 512 (retrieval_gpu); the same pipeline at L=256, top-k 32 (CI).
PRESETS["retrieval_gpu"] = dict(
  PRESETS["test"],
  dim=256,
  inter_dim=768,
  n_layers=2,
  n_dense_layers=2,
  n_heads=16,
  q_lora_rank=256,
  kv_lora_rank=256,
  qk_nope_head_dim=64,
  qk_rope_head_dim=32,
  v_head_dim=64,
  index_n_heads=64,
  index_head_dim=128,
  index_topk=512,
  original_seq_len=8192,
  max_seq_len=8192,
  n_mtp_layers=0,
  param_dtype="float32",
  compute_dtype="bfloat16",
  indexer_dtype="fp8",
  impl="pallas",
  attn_block_q=1024,
  remat=True,
  init_std=0.02,
)
PRESETS["retrieval_cpu"] = dict(
  PRESETS["test"],
  dim=64,
  inter_dim=192,
  n_layers=2,
  n_dense_layers=2,
  n_heads=2,
  q_lora_rank=32,
  kv_lora_rank=32,
  qk_nope_head_dim=16,
  qk_rope_head_dim=16,
  v_head_dim=16,
  index_n_heads=4,
  index_head_dim=32,
  index_topk=32,
  original_seq_len=256,
  max_seq_len=256,
  n_mtp_layers=0,
  param_dtype="float32",
  compute_dtype="float32",
  impl="reference",
  attn_block_q=256,
  remat=False,
  init_std=0.02,
)


def preset(name: str, **overrides) -> ModelConfig:
  """Builds a named size (a key of `PRESETS`: `test`, `debug`, `1b`, `v32_attn`, `v32_671b`, and
  the experiments' `demo`, `repro_h200`, `repro_cpu`, `walkthrough`, `walkthrough_tiny`) with
  field overrides."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})
