# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
r"""Writes tests/goldens/deepseek_v32_tiny/: a tiny random HF DeepSeek-V3.2 checkpoint made by
transformers' `DeepseekV32ForCausalLM` (CPU torch) and its fp32 logits on a fixed input, for
index_topk >= L (dense-equivalent) and index_topk < L (really sparse). Run once, in a separate
Python 3.11 venv that has torch (dsa-jax's own venv must not):

  /root/.pyenv/versions/3.11.7/bin/python3.11 -m venv /work/torchvenv
  /work/torchvenv/bin/pip install torch==2.13.0 'transformers>=5.23' numpy
  /work/torchvenv/bin/python experiments/make_hf_goldens.py --out=tests/goldens/deepseek_v32_tiny

tests/dsa_jax/test_convert.py then converts the checkpoint with dsa_jax.convert and compares logits
without torch. Plain argparse (no absl): this script runs outside dsa-jax's environment.
"""

import argparse
import json
import os
import shutil

import numpy as np
import torch
import transformers

L = 32  # sequence length of the golden input
TOPKS = (64, 8)  # >= L: every causal key selected; < L: sparse past position 7


def tiny_config():
  return transformers.DeepseekV32Config(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    index_n_heads=16,  # many heads: exact-zero (all-ReLU-off) score ties are rare (spec open q. 6)
    index_head_dim=32,
    index_topk=TOPKS[0],
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_parameters={
      "rope_type": "yarn",
      "rope_theta": 10000.0,
      "factor": 4.0,
      "original_max_position_embeddings": 64,
      "beta_fast": 32,
      "beta_slow": 1,
      "mscale": 1.0,
      "mscale_all_dim": 1.0,
    },
    initializer_range=0.02,
  )


@torch.no_grad()
def randomise(model):
  """Every tensor random (norm weights ~1, router bias nonzero) so a wrong mapping shows."""
  g = torch.Generator().manual_seed(0)
  for name, p in list(model.named_parameters()) + list(model.named_buffers()):
    if "inv_freq" in name:
      continue
    if name.endswith("e_score_correction_bias"):
      p.copy_(0.05 * torch.randn(p.shape, generator=g))
    elif "norm" in name:
      p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    elif name.endswith(("embed_tokens.weight",)):
      p.copy_(torch.randn(p.shape, generator=g))
    else:
      fan_in = p.shape[-1]
      p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="tests/goldens/deepseek_v32_tiny")
  args = ap.parse_args()
  torch.manual_seed(0)
  cfg = tiny_config()
  model = transformers.DeepseekV32ForCausalLM(cfg).eval()
  randomise(model)

  def set_topk(model, k):
    for layer in model.model.layers:
      layer.self_attn.indexer.index_topk = k

  write_golden(args.out, model, "400KB", set_topk, L, TOPKS)


def write_golden(out, model, max_shard_size, set_topk, seq_len, topks):
  """Saves model to out (shards of max_shard_size), reloads it and writes input_ids.npy, the
  logits for each index_topk (set_topk(model, k)) and golden_meta.json."""
  shutil.rmtree(out, ignore_errors=True)
  # Small shards so the golden exercises model.safetensors.index.json.
  model.save_pretrained(out, max_shard_size=max_shard_size)
  # Logits from the model as reloaded from disk: what the checkpoint really holds.
  model = type(model).from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
  vocab = model.config.vocab_size
  tokens = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(1))
  np.save(os.path.join(out, "input_ids.npy"), tokens.numpy().astype(np.int32))
  logits = {}
  for k in topks:
    set_topk(model, k)
    with torch.no_grad():
      logits[k] = model(tokens).logits.float().numpy()
    np.save(os.path.join(out, f"logits_topk{k}.npy"), logits[k])
  diff = float(np.abs(logits[topks[0]] - logits[topks[1]]).max())
  meta = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "attn_implementation": "eager",
    "seq_len": seq_len,
    "index_topks": list(topks),
    "max_abs_logit_diff_between_topks": diff,
  }
  with open(os.path.join(out, "golden_meta.json"), "w") as f:
    json.dump(meta, f, indent=2)
  print(json.dumps(meta, indent=2))
  total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  print(f"wrote {out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
  main()
