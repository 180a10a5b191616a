# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""V4Config validation, presets, HF config mapping, sharding names and parameter counts."""

import jax
import pytest
from flax import nnx

from dsa_jax import sharding
from dsa_jax.v4 import config, model

# nnx.eval_shape of the full models (nothing allocated). The published totals are 284B (Flash)
# and 1.6T (Pro), counted without the MTP module as for V3's 671B (docs/v4.md §Parameters).
COUNTS = {
  "v4_flash": {"main": 284_332_240_471, "mtp": 6_610_048_891},
  "v4_pro": {"main": 1_572_997_201_763, "mtp": 25_840_145_979},
}


@pytest.fixture(scope="module")
def flash():
  return model.abstract(config.preset("v4_flash"))


def test_parameter_counts_match_the_published_totals(flash):
  got = {"v4_flash": model.param_count(flash) - model.param_count(flash.mtp)}
  got_pro = model.param_counts(config.preset("v4_pro"))
  assert got["v4_flash"] == COUNTS["v4_flash"]["main"]
  assert model.param_count(flash.mtp) == COUNTS["v4_flash"]["mtp"]
  assert {k: got_pro[k] for k in ("main", "mtp")} == COUNTS["v4_pro"]
  assert round(COUNTS["v4_flash"]["main"] / 1e9) == 284
  assert round(COUNTS["v4_pro"]["main"] / 1e12, 1) == 1.6


def test_every_parameter_has_known_logical_axes(flash):
  for path, var in nnx.to_flat_state(nnx.state(flash)):
    axes = var.get_metadata().get("logical_axes")
    assert axes and all(a in sharding.DEFAULT_RULES for a in axes), path
    assert len(sharding._var_axes(var)) == var.get_value().ndim, path
  mesh = jax.sharding.AbstractMesh((1, 1, 8, 1, 1), sharding.MESH_AXES)
  wo_a = flash.layers[2].attn.wo_a
  spec = sharding.spec_for(wo_a.get_metadata()["logical_axes"], wo_a.get_value().shape, mesh)
  assert spec == jax.sharding.PartitionSpec("tensor", None, None)  # output groups like heads


def test_presets_and_layer_schedule():
  f, p = config.preset("v4_flash"), config.preset("v4_pro")
  kinds = lambda c: [c.layer_kind(i) for i in range(len(c.compress_ratios))]
  assert kinds(f)[:4] == ["window", "window", "csa", "hca"] and kinds(f)[-2:] == ["csa", "window"]
  assert (kinds(f).count("csa"), kinds(f).count("hca")) == (21, 20)
  assert kinds(p)[:3] == ["hca", "hca", "csa"] and (
    kinds(p).count("csa"),
    kinds(p).count("hca"),
  ) == (30, 31)
  assert f.softmax_scale == 512**-0.5 and f.hc_mix == 24
  assert set(kinds(config.preset("v4_test"))) == {"window", "csa", "hca"}


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(compress_ratios=(0, 4)), "compress_ratios"),
    (dict(compress_ratios=(0, 2, 16, 0)), "compress_ratios"),
    (dict(o_groups=3), "o_groups"),
    (dict(n_mtp_layers=2, compress_ratios=(0, 4, 16, 0, 0)), "n_mtp_layers"),
    (dict(score_func="relu"), "score_func"),
    (dict(index_head_dim=24), "index_head_dim"),
    (dict(indexer_quant="int8"), "indexer_quant"),
    (dict(n_hash_layers=9), "n_hash_layers"),
    (dict(swiglu_limit=-1.0), "swiglu_limit"),
    (dict(impl="triton"), "impl"),
  ],
)
def test_invalid_values_raise_one_line_errors(kw, match):
  with pytest.raises(ValueError, match=match) as e:
    config.preset("v4_test", **kw)
  assert "\n" not in str(e.value) and "V4Config." in str(e.value)


def test_from_hf_config_maps_deepseek_keys():
  f = config.preset("v4_flash")
  hf = {
    "vocab_size": 129280,
    "hidden_size": 4096,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 43,
    "num_hash_layers": 3,
    "num_attention_heads": 64,
    "num_key_value_heads": 1,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "q_lora_rank": 1024,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "sliding_window": 128,
    "compress_ratios": list(f.compress_ratios),
    "compress_rope_theta": 160000,
    "rope_theta": 10000,
    "rope_scaling": {
      "type": "yarn",
      "factor": 16,
      "original_max_position_embeddings": 65536,
      "beta_fast": 32,
      "beta_slow": 1,
    },
    "index_topk": 512,
    "max_position_embeddings": 1048576,
    "num_nextn_predict_layers": 1,
    "hc_mult": 4,
    "quantization_config": {"quant_method": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4"},
  }
  got = config.V4Config.from_hf_config(hf, param_dtype="bfloat16")
  assert got == f
  with pytest.raises(ValueError, match="num_key_value_heads"):
    config.V4Config.from_hf_config({**hf, "num_key_value_heads": 8})
  with pytest.raises(ValueError, match="not understood"):
    config.V4Config.from_hf_config({**hf, "kv_lora_rank": 512})
  with pytest.raises(ValueError, match="missing"):
    config.V4Config.from_hf_config({k: v for k, v in hf.items() if k != "head_dim"})
