# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""Writes tests/goldens/deepseek_v4_tiny/: a tiny random HF DeepSeek-V4 checkpoint saved by
transformers' `DeepseekV4ForCausalLM` (CPU torch) and its fp32 logits on a fixed input, for an
index_topk that covers every visible compressed entry and one that does not. Run once, in a
separate Python 3.11 venv that has torch (dsa-jax's own venv must not):

  /root/.pyenv/versions/3.11.7/bin/python3.11 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 'transformers>=5.18' numpy
  /tmp/hfvenv/bin/python experiments/make_v4_hf_goldens.py --out=tests/goldens/deepseek_v4_tiny

The tiny model has the three attention layer types (window-only, CSA with m = 4, HCA with m = 16 so
that a 64-token input has complete blocks), a hash-routed first layer and learned routing after it.
tests/dsa_jax/v4/test_convert.py converts the checkpoint with dsa_jax.convert and compares logits
without torch. Plain argparse (no absl): this script runs outside dsa-jax's environment.
"""

import argparse

import torch
import transformers
from make_hf_goldens import write_golden  # this script's folder (run as a script, not -m)

L = 64  # tokens of the golden input: 16 CSA entries, 4 HCA entries at the end
TOPKS = (16, 4)  # >= every visible CSA entry (dense-equivalent); < visible past position 19


def tiny_config():
  return transformers.DeepseekV4Config(
    vocab_size=128,
    hidden_size=32,
    moe_intermediate_size=16,
    num_hidden_layers=4,
    layer_types=[
      "sliding_attention",
      "compressed_sparse_attention",
      "heavily_compressed_attention",
      "compressed_sparse_attention",
    ],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
    num_attention_heads=4,
    head_dim=32,
    partial_rotary_factor=8 / 32,  # 8 rope dims
    q_lora_rank=16,
    o_groups=2,
    o_lora_rank=8,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    routed_scaling_factor=1.5,
    sliding_window=8,
    index_n_heads=16,  # many heads: exact-zero (all-ReLU-off) score ties are rare
    index_head_dim=16,
    index_topk=TOPKS[0],
    rope_theta=10000.0,
    compress_rope_theta=1000.0,
    rope_parameters={
      "rope_type": "yarn",
      "factor": 4.0,
      "original_max_position_embeddings": 32,
      "beta_fast": 32,
      "beta_slow": 1,
    },
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
  )


@torch.no_grad()
def randomise(model, cfg):
  """Every tensor random (norm weights ~1, biases and sinks nonzero) so a wrong mapping shows."""
  g = torch.Generator().manual_seed(0)
  for name, p in list(model.named_parameters()) + list(model.named_buffers()):
    if "inv_freq" in name:
      continue
    if name.endswith("tid2eid"):  # k distinct experts per token
      rows = [torch.randperm(cfg.n_routed_experts, generator=g)[: p.shape[1]] for _ in p]
      p.copy_(torch.stack(rows))
    elif name.endswith("e_score_correction_bias"):
      p.copy_(0.05 * torch.randn(p.shape, generator=g))
    elif "norm" in name or name.endswith(("scale", "hc_scale")):
      p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    elif name.endswith("embed_tokens.weight"):
      p.copy_(torch.randn(p.shape, generator=g))
    elif p.dim() == 1:  # sinks, hyper-connection biases
      p.copy_(0.5 * torch.randn(p.shape, generator=g))
    elif name.endswith("position_bias"):  # the compressors' ape
      p.copy_(0.5 * torch.randn(p.shape, generator=g))
    else:
      p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="tests/goldens/deepseek_v4_tiny")
  args = ap.parse_args()
  torch.manual_seed(0)
  cfg = tiny_config()
  model = transformers.DeepseekV4ForCausalLM(cfg).eval()
  randomise(model, cfg)

  def set_topk(model, k):
    for layer in model.model.layers:
      if layer.self_attn.compressor is not None and hasattr(layer.self_attn.compressor, "indexer"):
        layer.self_attn.compressor.indexer.index_topk = k

  write_golden(args.out, model, "200KB", set_topk, L, TOPKS)


if __name__ == "__main__":
  main()
