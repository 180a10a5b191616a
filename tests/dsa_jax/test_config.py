# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
import json

import pytest

from dsa_jax import config

# The HF config.json of DeepSeek-V3.2(-Exp).
HF_V32 = {
  "architectures": ["DeepseekV32ForCausalLM"],
  "model_type": "deepseek_v32",
  "hidden_size": 7168,
  "intermediate_size": 18432,
  "moe_intermediate_size": 2048,
  "num_hidden_layers": 61,
  "num_attention_heads": 128,
  "num_key_value_heads": 128,
  "q_lora_rank": 1536,
  "kv_lora_rank": 512,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "v_head_dim": 128,
  "n_routed_experts": 256,
  "n_shared_experts": 1,
  "num_experts_per_tok": 8,
  "n_group": 8,
  "topk_group": 4,
  "topk_method": "noaux_tc",
  "scoring_func": "sigmoid",
  "norm_topk_prob": True,
  "routed_scaling_factor": 2.5,
  "first_k_dense_replace": 3,
  "moe_layer_freq": 1,
  "num_nextn_predict_layers": 1,
  "index_n_heads": 64,
  "index_head_dim": 128,
  "index_topk": 2048,
  "vocab_size": 129280,
  "max_position_embeddings": 163840,
  "rope_theta": 10000,
  "rope_scaling": {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
  },
  "rms_norm_eps": 1e-6,
  "hidden_act": "silu",
  "tie_word_embeddings": False,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "attention_bias": False,
  "torch_dtype": "bfloat16",
  "quantization_config": {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128],
  },
}


@pytest.mark.parametrize("name", sorted(config.PRESETS))
def test_presets_build(name):
  cfg = config.preset(name)
  assert cfg.index_topk > 0 and hash(cfg)


def test_v32_preset_matches_reference_config():
  cfg = config.preset("v32_671b")
  # inference/config_671B_v3.2.json (DeepSeek's reference config)
  ref = dict(
    vocab_size=129280,
    dim=7168,
    inter_dim=18432,
    moe_inter_dim=2048,
    n_layers=61,
    n_dense_layers=3,
    n_heads=128,
    n_routed_experts=256,
    n_shared_experts=1,
    n_activated_experts=8,
    n_expert_groups=8,
    n_limited_groups=4,
    route_scale=2.5,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    scale_fmt="ue8m0",
    index_n_heads=64,
    index_head_dim=128,
    index_topk=2048,
    original_seq_len=4096,
    rope_theta=10000.0,
    rope_factor=40,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    norm_eps=1e-6,
    n_mtp_layers=1,
  )
  for k, v in ref.items():
    assert getattr(cfg, k) == v, k
  assert cfg.latent_dim == 576 and cfg.qk_head_dim == 192
  assert cfg.softmax_scale == pytest.approx(0.13523378, abs=1e-8)


def test_from_hf_config_dict_and_file(tmp_path):
  cfg = config.ModelConfig.from_hf_config(HF_V32, param_dtype="bfloat16", compute_dtype="bfloat16")
  ref = config.preset("v32_671b")
  for f in (
    "dim",
    "n_layers",
    "index_topk",
    "rope_factor",
    "original_seq_len",
    "max_seq_len",
    "route_scale",
    "n_limited_groups",
    "scale_fmt",
    "n_mtp_layers",
    "mscale",
  ):
    assert getattr(cfg, f) == getattr(ref, f), f
  p = tmp_path / "config.json"
  p.write_text(json.dumps(HF_V32))
  assert config.ModelConfig.from_hf_config(tmp_path).dim == 7168
  assert config.ModelConfig.from_hf_config(p).softmax_scale == pytest.approx(0.13523378, abs=1e-8)


@pytest.mark.parametrize(
  "key,value",
  [
    ("scoring_func", "softmax"),
    ("topk_method", "greedy"),
    ("hidden_act", "gelu"),
    ("tie_word_embeddings", True),
    ("num_key_value_heads", 8),
    ("moe_layer_freq", 2),
    ("some_new_key", 3),
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
  ],
)
def test_from_hf_config_rejects_what_it_cannot_represent(key, value):
  bad = dict(HF_V32, **{key: value})
  with pytest.raises(ValueError, match=key.split("_")[0]):
    config.ModelConfig.from_hf_config(bad)


def test_from_hf_config_missing_file(tmp_path):
  with pytest.raises(ValueError, match="not found"):
    config.ModelConfig.from_hf_config(tmp_path / "nope.json")


BAD = [
  ("dim", 0),
  ("dim", -4),
  ("dim", 3.5),
  ("vocab_size", None),
  ("n_layers", 0),
  ("n_dense_layers", -1),
  ("n_dense_layers", 99),
  ("n_heads", 0),
  ("q_lora_rank", 0),
  ("kv_lora_rank", -1),
  ("qk_rope_head_dim", 7),
  ("v_head_dim", 0),
  ("index_n_heads", 0),
  ("index_head_dim", 96),
  ("index_topk", 0),
  ("n_routed_experts", 0),
  ("n_activated_experts", 999),
  ("n_expert_groups", 5),
  ("n_limited_groups", 0),
  ("n_limited_groups", 9),
  ("route_scale", 0.0),
  ("scale_fmt", "e5m2"),
  ("rope_theta", -1.0),
  ("rope_factor", 0),
  ("beta_fast", 1),
  ("mscale", 0),
  ("norm_eps", 0),
  ("n_mtp_layers", 2),
  ("param_dtype", "float64"),
  ("compute_dtype", "int8"),
  ("indexer_dtype", "fp4"),
  ("impl", "cuda"),
  ("attn_block_q", 0),
  ("max_seq_len", 0),
  ("original_seq_len", 0),
  ("init_std", 0.0),
]


@pytest.mark.parametrize("field,value", BAD)
def test_every_bad_value_raises_with_its_name(field, value):
  with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
    config.preset("v32_671b", **{field: value})


def test_unknown_preset_and_field():
  with pytest.raises(ValueError, match="unknown preset"):
    config.preset("7b")
  with pytest.raises(ValueError, match="unknown ModelConfig field"):
    config.ModelConfig.from_dict({"dimm": 3})
  # an older record with the removed (never read) fields still loads
  old = dict(config.preset("test").to_dict(), score_func="sigmoid", dtype="fp8", max_batch_size=8)
  assert config.ModelConfig.from_dict(old) == config.preset("test")


def test_from_hf_config_reads_transformers_v5_golden_config():
  """The config.json transformers 5.24 wrote for the tiny parity checkpoint (derived keys incl.)."""
  import os

  p = os.path.join(os.path.dirname(__file__), "..", "goldens", "deepseek_v32_tiny", "config.json")
  hf = json.load(open(p))
  cfg = config.ModelConfig.from_hf_config(hf)
  assert cfg.n_mtp_layers == 0  # transformers' port has no MTP key and never runs it
  assert cfg.dim == hf["hidden_size"] and cfg.index_n_heads == hf["index_n_heads"]
  with pytest.raises(ValueError, match="head_dim"):
    config.ModelConfig.from_hf_config(dict(hf, head_dim=3))
