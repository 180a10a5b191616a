# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""V4Config: the DeepSeek-V4 architecture (Flash / Pro) and this implementation's knobs.

Field names follow DeepSeek's V4 reference `ModelArgs`; `from_hf_config` maps a raw HF
`config.json` onto them. Frozen and hashable (a static jit argument); every invalid value raises a
one-line `ValueError` naming the field, the value and the rule. See docs/v4.md.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from dsa_jax import config as model_config

_DTYPES = ("float32", "bfloat16")
_SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
# Fake-quant of the indexer q/k: "fp4" Hadamard + e2m1 per 32 (DeepSeek's reference), "fp8"
# Hadamard + e4m3 per vector (V3.2 style), "none" plain (HF transformers / MaxText).
_INDEXER_QUANTS = ("fp4", "fp8", "none")
# Fake-quant of the no-rope dims of window and compressed rows: "fp8" e4m3 per 64 (reference).
_KV_QUANTS = ("fp8", "none")
# Attention kernels: "reference" (pure JAX) | "pallas" (the sparse-attention kernels, GPU / TPU;
# the indexer ops still run their references, docs/v4.md §Kernels).
_IMPLS = ("reference", "pallas")

WINDOW, CSA, HCA = "window", "csa", "hca"


def _err(field: str, value: Any, rule: str) -> ValueError:
  return ValueError(f"V4Config.{field}={value!r} is invalid: {rule}")


def _flash_ratios() -> tuple[int, ...]:
  # 2 window-only layers, then CSA/HCA alternating, a last CSA layer, and the MTP layer (0).
  return (0, 0) + (4, 128) * 20 + (4,) + (0,)


def _pro_ratios() -> tuple[int, ...]:
  return (128, 128) + (4, 128) * 29 + (4,) + (0,)


@dataclasses.dataclass(frozen=True, kw_only=True)
class V4Config:
  """DeepSeek-V4 (docs/v4.md §Config); the defaults are V4-Flash."""

  vocab_size: int = 129280
  dim: int = 4096
  moe_inter_dim: int = 2048
  n_layers: int = 43
  n_hash_layers: int = 3
  n_heads: int = 64
  # MoE: sqrt-softplus router, bias used for selection only, no group limit.
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  n_activated_experts: int = 6
  score_func: str = "sqrtsoftplus"
  route_scale: float = 1.5
  swiglu_limit: float = 10.0
  # Attention: one 512-wide K = V row per key, rope on its last rope_head_dim dims.
  q_lora_rank: int = 1024
  head_dim: int = 512
  rope_head_dim: int = 64
  norm_eps: float = 1e-6
  o_groups: int = 8
  o_lora_rank: int = 1024
  window_size: int = 128
  # One entry per layer plus one per MTP layer (last): 0 window only, 4 CSA, > 4 HCA.
  compress_ratios: tuple[int, ...] = dataclasses.field(default_factory=_flash_ratios)
  # RoPE: window-only layers use rope_theta and no YaRN; compressed layers compress_rope_theta
  # with YaRN (factor, original_seq_len, beta_fast/slow; no mscale on the softmax scale).
  rope_theta: float = 10000.0
  compress_rope_theta: float = 160000.0
  rope_factor: float = 16.0
  original_seq_len: int = 65536
  beta_fast: int = 32
  beta_slow: int = 1
  # Lightning indexer of the CSA layers.
  index_n_heads: int = 64
  index_head_dim: int = 128
  index_topk: int = 512
  # Hyper-connections: hc_mult residual streams mixed through Sinkhorn-projected matrices.
  hc_mult: int = 4
  hc_sinkhorn_iters: int = 20
  hc_eps: float = 1e-6
  max_seq_len: int = 1048576
  max_batch_size: int = 8
  n_mtp_layers: int = 1
  # Checkpoint formats (conversion): fp8 128x128 weights, fp4 experts.
  dtype: str = "fp8"
  scale_fmt: str | None = "ue8m0"
  expert_dtype: str | None = "fp4"
  # --- implementation knobs (not in DeepSeek's config) ---
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"
  indexer_quant: str = "fp4"
  kv_quant: str = "fp8"
  impl: str = "reference"
  attn_block_q: int = 512
  init_std: float = 0.006
  remat: bool = False  # jax.checkpoint each block (as ModelConfig.remat)
  remat_policy: str = "full"  # what a remat block keeps: ModelConfig.remat_policy

  def __post_init__(self):
    pos_int = (
      "vocab_size dim moe_inter_dim n_layers n_heads n_routed_experts n_activated_experts "
      "q_lora_rank head_dim rope_head_dim o_groups o_lora_rank window_size index_n_heads "
      "index_head_dim index_topk hc_mult hc_sinkhorn_iters max_seq_len max_batch_size "
      "attn_block_q beta_fast"
    ).split()
    for f in pos_int:
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise _err(f, v, "must be a positive int")
    for f in "n_hash_layers n_shared_experts n_mtp_layers original_seq_len beta_slow".split():
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _err(f, v, "must be a non-negative int")
    for (
      f
    ) in "route_scale norm_eps rope_theta compress_rope_theta rope_factor hc_eps init_std".split():
      v = getattr(self, f)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        raise _err(f, v, "must be a positive number")
    if not isinstance(self.swiglu_limit, (int, float)) or self.swiglu_limit < 0:
      raise _err("swiglu_limit", self.swiglu_limit, "must be a number >= 0 (0: no clamp)")
    r = self.compress_ratios
    if not isinstance(r, tuple) or not all(isinstance(x, int) for x in r):
      raise _err("compress_ratios", r, "must be a tuple of ints")
    if len(r) != self.n_layers + self.n_mtp_layers:
      raise _err(
        "compress_ratios",
        r,
        f"needs n_layers + n_mtp_layers = {self.n_layers + self.n_mtp_layers} entries",
      )
    bad = sorted({x for x in r if x < 0 or 0 < x < 4})
    if bad:
      raise _err("compress_ratios", bad, "entries must be 0 (window), 4 (CSA) or > 4 (HCA)")
    if self.n_mtp_layers > 1:
      raise _err("n_mtp_layers", self.n_mtp_layers, "only 0 or 1 MTP module is supported")
    if self.n_hash_layers > self.n_layers:
      raise _err("n_hash_layers", self.n_hash_layers, f"must be <= n_layers={self.n_layers}")
    if self.n_activated_experts > self.n_routed_experts:
      raise _err(
        "n_activated_experts",
        self.n_activated_experts,
        f"must be <= n_routed_experts={self.n_routed_experts}",
      )
    if self.score_func not in _SCORE_FUNCS:
      raise _err("score_func", self.score_func, f"must be one of {_SCORE_FUNCS}")
    if self.rope_head_dim % 2 or self.rope_head_dim > min(self.head_dim, self.index_head_dim):
      raise _err(
        "rope_head_dim",
        self.rope_head_dim,
        f"must be even and <= head_dim={self.head_dim}, index_head_dim={self.index_head_dim}",
      )
    if self.n_heads % self.o_groups:
      raise _err("o_groups", self.o_groups, f"must divide n_heads={self.n_heads}")
    if self.indexer_quant != "none" and self.index_head_dim & (self.index_head_dim - 1):
      raise _err("index_head_dim", self.index_head_dim, "must be a power of two (Hadamard)")
    if self.beta_fast <= self.beta_slow:
      raise _err("beta_fast", self.beta_fast, f"must be > beta_slow={self.beta_slow}")
    for f, allowed in (
      ("dtype", ("fp8", "bf16")),
      ("scale_fmt", (None, "ue8m0")),
      ("expert_dtype", (None, "fp4", "fp8")),
      ("param_dtype", _DTYPES),
      ("compute_dtype", _DTYPES),
      ("indexer_quant", _INDEXER_QUANTS),
      ("kv_quant", _KV_QUANTS),
      ("impl", _IMPLS),
      ("remat_policy", model_config._REMAT_POLICIES),
    ):
      if getattr(self, f) not in allowed:
        raise _err(f, getattr(self, f), f"must be one of {allowed}")

  # Derived (docs/v4.md §Config).
  def layer_kind(self, i: int) -> str:
    """WINDOW, CSA or HCA for layer i (i = n_layers: the MTP layer)."""
    m = self.compress_ratios[i]
    return WINDOW if m == 0 else CSA if m == 4 else HCA

  @property
  def softmax_scale(self) -> float:
    """head_dim^-0.5 (0.0442 for 512): no YaRN mscale in V4."""
    return self.head_dim**-0.5

  @property
  def nope_dim(self) -> int:
    return self.head_dim - self.rope_head_dim

  @property
  def hc_mix(self) -> int:
    """Width of the hyper-connection mixing logits: pre (M) + post (M) + comb (M·M)."""
    return (2 + self.hc_mult) * self.hc_mult

  def replace(self, **kw) -> "V4Config":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_hf_config(cls, path_or_dict: str | os.PathLike | dict, **overrides) -> "V4Config":
    """Reads a DeepSeek-V4 HF `config.json` (raw hub names); rejects what it cannot represent."""
    hf = model_config.read_hf_config(path_or_dict)
    missing = [k for k in _HF_SHAPE_KEYS if k not in hf and _HF_MAP[k] not in overrides]
    if missing:  # the defaults are V4-Flash's: never a silent fill-in
      raise ValueError(f"HF config is missing required key(s) {missing}")
    out: dict[str, Any] = {"n_mtp_layers": 0}
    for k, v in hf.items():
      if k in _HF_MAP:
        out[_HF_MAP[k]] = tuple(v) if k == "compress_ratios" else v
      elif k in _HF_REQUIRED:
        if v != _HF_REQUIRED[k]:
          raise ValueError(
            f"HF config key {k!r}={v!r} cannot be represented: needs {_HF_REQUIRED[k]!r}"
          )
      elif k == "rope_scaling":
        out.update(_hf_rope(v))
      elif k == "quantization_config":
        out.update(_hf_quant(v))
      elif k not in _HF_IGNORED:
        raise ValueError(f"HF config key {k!r} (value {v!r}) is not understood by dsa_jax.v4")
    if "quantization_config" not in hf:
      out.update(dtype="bf16", scale_fmt=None, expert_dtype=None)
    for f in ("rope_theta", "compress_rope_theta", "rope_factor"):
      if isinstance(out.get(f), int):
        out[f] = float(out[f])
    return cls(**{**out, **overrides})


def _hf_rope(rope) -> dict:
  if not isinstance(rope, dict) or rope.get("type", rope.get("rope_type")) != "yarn":
    raise ValueError(f"HF config key 'rope_scaling'={rope!r}: V4 compressed layers use yarn")
  if rope.get("mscale", 1.0) != 1.0 or rope.get("mscale_all_dim", 1.0) != 1.0:
    raise ValueError(f"HF config key 'rope_scaling'={rope!r}: V4 has no YaRN mscale")
  keys = {
    "factor": "rope_factor",
    "original_max_position_embeddings": "original_seq_len",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
  }
  return {f: rope[k] for k, f in keys.items() if k in rope}


def _hf_quant(q) -> dict:
  if q.get("quant_method") != "fp8" or list(q.get("weight_block_size", [128, 128])) != [128, 128]:
    raise ValueError(f"HF config key 'quantization_config'={q!r}: only fp8 128x128 blocks")
  return {"dtype": "fp8", "scale_fmt": q.get("scale_fmt"), "expert_dtype": q.get("expert_dtype")}


_HF_SHAPE_KEYS = (
  "vocab_size",
  "hidden_size",
  "moe_intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "n_routed_experts",
  "num_experts_per_tok",
  "q_lora_rank",
  "head_dim",
  "qk_rope_head_dim",
  "o_groups",
  "o_lora_rank",
  "compress_ratios",
)
_HF_MAP = {
  "vocab_size": "vocab_size",
  "hidden_size": "dim",
  "moe_intermediate_size": "moe_inter_dim",
  "num_hidden_layers": "n_layers",
  "num_hash_layers": "n_hash_layers",
  "num_attention_heads": "n_heads",
  "n_routed_experts": "n_routed_experts",
  "n_shared_experts": "n_shared_experts",
  "num_experts_per_tok": "n_activated_experts",
  "scoring_func": "score_func",
  "routed_scaling_factor": "route_scale",
  "swiglu_limit": "swiglu_limit",
  "q_lora_rank": "q_lora_rank",
  "head_dim": "head_dim",
  "qk_rope_head_dim": "rope_head_dim",
  "rms_norm_eps": "norm_eps",
  "o_groups": "o_groups",
  "o_lora_rank": "o_lora_rank",
  "sliding_window": "window_size",
  "compress_ratios": "compress_ratios",
  "rope_theta": "rope_theta",
  "compress_rope_theta": "compress_rope_theta",
  "index_n_heads": "index_n_heads",
  "index_head_dim": "index_head_dim",
  "index_topk": "index_topk",
  "hc_mult": "hc_mult",
  "hc_sinkhorn_iters": "hc_sinkhorn_iters",
  "hc_eps": "hc_eps",
  "max_position_embeddings": "max_seq_len",
  "num_nextn_predict_layers": "n_mtp_layers",
  "initializer_range": "init_std",
}
_HF_REQUIRED = {
  "num_key_value_heads": 1,  # K = V: one shared row per key
  "hidden_act": "silu",
  "tie_word_embeddings": False,
  "attention_bias": False,
  "topk_method": "noaux_tc",
  "norm_topk_prob": True,
}
_HF_IGNORED = set(
  "architectures model_type transformers_version torch_dtype dtype bos_token_id eos_token_id "
  "pad_token_id use_cache auto_map attention_dropout _name_or_path tokenizer_class "
  "layer_types compress_rates rope_parameters mlp_layer_types partial_rotary_factor "
  "output_router_logits router_aux_loss_coef".split()
)


PRESETS: dict[str, dict[str, Any]] = {
  # CPU unit tests: all three layer types (window, CSA, HCA with m=16), a hash-routed layer, MTP.
  "v4_test": dict(
    vocab_size=256,
    dim=64,
    moe_inter_dim=32,
    n_layers=3,
    n_hash_layers=1,
    n_heads=4,
    n_routed_experts=8,
    n_activated_experts=2,
    q_lora_rank=32,
    head_dim=32,
    rope_head_dim=8,
    o_groups=2,
    o_lora_rank=16,
    window_size=8,
    compress_ratios=(0, 4, 16, 0),
    compress_rope_theta=1000.0,
    rope_factor=4.0,
    original_seq_len=32,
    index_n_heads=4,
    index_head_dim=16,
    index_topk=4,
    max_seq_len=256,
    param_dtype="float32",
    compute_dtype="float32",
    attn_block_q=16,
    init_std=0.02,
  ),
  # Exactly DeepSeek-V4-Flash (284B) and DeepSeek-V4-Pro (1.6T).
  "v4_flash": dict(param_dtype="bfloat16"),
  "v4_pro": dict(
    dim=7168,
    moe_inter_dim=3072,
    n_layers=61,
    n_heads=128,
    n_routed_experts=384,
    route_scale=2.5,
    q_lora_rank=1536,
    o_groups=16,
    compress_ratios=_pro_ratios(),
    index_topk=1024,
    param_dtype="bfloat16",
  ),
}


def preset(name: str, **overrides) -> V4Config:
  """Builds a named V4 size (`v4_test`, `v4_flash`, `v4_pro`) with field overrides."""
  if name not in PRESETS:
    raise ValueError(f"unknown V4 preset {name!r}; expected one of {sorted(PRESETS)}")
  return V4Config(**{**PRESETS[name], **overrides})
