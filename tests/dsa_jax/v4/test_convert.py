# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""DeepSeek-V4 HF safetensors <-> Orbax conversion (dsa_jax.convert.deepseek_v4_hf): name map
against the published Flash listing and transformers' save, round trips, FP8 / FP4, HF parity,
bad input.

The parity goldens (tests/goldens/deepseek_v4_tiny) were written by transformers'
DeepseekV4ForCausalLM via experiments/make_v4_hf_goldens.py; these tests read only safetensors + npy.
"""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from convert_testing import convert_cli, flat, leftovers, same_dirs

from dsa_jax import checkpoint, v4
from dsa_jax.convert import common, orbax_io, safetensors_io
from dsa_jax.convert import deepseek_v4_hf as cv

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "..", "goldens", "deepseek_v4_tiny")
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)


def _read_all(path):
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    wm = json.load(f)["weight_map"]
  out = {}
  for fn in sorted(set(wm.values())):
    r = safetensors_io.Reader(os.path.join(path, fn))
    out.update({n: r.read(n) for n in r.infos})
  return out


def _write_hf(path, tensors, config):
  """One-shard HF directory from {name: array} and a config dict."""
  os.makedirs(path)
  fn = "model-00001-of-00001.safetensors"
  specs = {n: (safetensors_io.dtype_name(a.dtype), a.shape) for n, a in tensors.items()}
  w = safetensors_io.Writer(os.path.join(path, fn), specs, {"format": "pt"})
  for n in w.order:
    w.write(n, tensors[n])
  w.close()
  total = sum(a.nbytes for a in tensors.values())
  common.write_index(path, {n: fn for n in tensors}, {"total_size": total})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return path


def _edit_hf(src, dst, edit, config_edit=None):
  tensors = _read_all(src)
  edit(tensors)
  with open(os.path.join(src, "config.json")) as f:
    c = json.load(f)
  if config_edit:
    config_edit(c)
  return _write_hf(dst, tensors, c)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
  """v4_test (window / CSA / HCA layers, a hash layer, MTP): params, its fp32 and its quantised
  hub exports (fresh power-of-two scales)."""
  root = tmp_path_factory.mktemp("v4src")
  cfg = v4.preset("v4_test")
  m = v4.build(cfg, seed=1)
  checkpoint.save_params(root / "orbax", m)
  o = str(root / "orbax")
  cv.orbax_to_hf(o, str(root / "hf"), cfg=cfg, dtype="fp32", progress=False)
  cv.orbax_to_hf(o, str(root / "hf8"), cfg=cfg, quantized=True, progress=False)
  return cfg, flat(m), str(root / "hf"), str(root / "hf8")


# ------------------------------------------------------------------------------------------------
# Name map

# DeepSeek-V4-Flash's published tensor listing (model.safetensors.index.json + shard headers):
# (name, layers it appears in, shape, dtype); {i} layer, {e} expert (0-255).
_ALL, _CSA, _HCA = range(43), range(2, 43, 2), range(3, 42, 2)
_LINEAR_FP8 = {  # name: (weight shape, e8m0 scale shape)
  "attn.wq_a": ([1024, 4096], [8, 32]),
  "attn.wq_b": ([32768, 1024], [256, 8]),
  "attn.wkv": ([512, 4096], [4, 32]),
  "attn.wo_a": ([8192, 4096], [64, 32]),
  "attn.wo_b": ([4096, 8192], [32, 64]),
  "ffn.shared_experts.w1": ([2048, 4096], [16, 32]),
  "ffn.shared_experts.w2": ([4096, 2048], [32, 16]),
  "ffn.shared_experts.w3": ([2048, 4096], [16, 32]),
}
_EXPERT_FP4 = {  # int8-packed e2m1 [out, in/2], e8m0 scale [out, in/32]
  "w1": ([2048, 2048], [2048, 128]),
  "w2": ([4096, 1024], [4096, 64]),
  "w3": ([2048, 2048], [2048, 128]),
}
_BLOCK = {
  "attn.attn_sink": ([64], "F32"),
  "attn.kv_norm.weight": ([512], "BF16"),
  "attn.q_norm.weight": ([1024], "BF16"),
  "attn_norm.weight": ([4096], "BF16"),
  "ffn_norm.weight": ([4096], "BF16"),
  "ffn.gate.weight": ([256, 4096], "BF16"),
  "hc_attn_fn": ([24, 16384], "F32"),
  "hc_attn_base": ([24], "F32"),
  "hc_attn_scale": ([3], "F32"),
  "hc_ffn_fn": ([24, 16384], "F32"),
  "hc_ffn_base": ([24], "F32"),
  "hc_ffn_scale": ([3], "F32"),
}
_CSA_ONLY = {
  "attn.compressor.ape": ([4, 1024], "F32"),
  "attn.compressor.wgate.weight": ([1024, 4096], "BF16"),
  "attn.compressor.wkv.weight": ([1024, 4096], "BF16"),
  "attn.indexer.compressor.ape": ([4, 256], "F32"),
  "attn.indexer.compressor.norm.weight": ([128], "BF16"),
  "attn.indexer.compressor.wgate.weight": ([256, 4096], "BF16"),
  "attn.indexer.compressor.wkv.weight": ([256, 4096], "BF16"),
  "attn.indexer.weights_proj.weight": ([64, 4096], "BF16"),
  "attn.indexer.wq_b.weight": ([8192, 1024], "F8_E4M3"),
  "attn.indexer.wq_b.scale": ([64, 8], "F8_E8M0"),
}
_HCA_ONLY = {
  "attn.compressor.ape": ([128, 512], "F32"),
  "attn.compressor.wgate.weight": ([512, 4096], "BF16"),
  "attn.compressor.wkv.weight": ([512, 4096], "BF16"),
}


def _flash_listing():
  out = {
    "embed.weight": ("BF16", [129280, 4096]),
    "head.weight": ("BF16", [129280, 4096]),
    "norm.weight": ("BF16", [4096]),
    "hc_head_fn": ("F32", [4, 16384]),
    "hc_head_base": ("F32", [4]),
    "hc_head_scale": ("F32", [1]),
  }
  for i, p in [(i, f"layers.{i}") for i in _ALL] + [(None, "mtp.0")]:
    for n, (shape, dt) in _BLOCK.items():
      out[f"{p}.{n}"] = (dt, shape)
    for n, (shape, sshape) in _LINEAR_FP8.items():
      out[f"{p}.{n}.weight"] = ("F8_E4M3", shape)
      out[f"{p}.{n}.scale"] = ("F8_E8M0", sshape)
    for e in range(256):
      for n, (shape, sshape) in _EXPERT_FP4.items():
        out[f"{p}.ffn.experts.{e}.{n}.weight"] = ("I8", shape)
        out[f"{p}.ffn.experts.{e}.{n}.scale"] = ("F8_E8M0", sshape)
    if i is not None and i >= 2:
      out[f"{p}.attn.compressor.norm.weight"] = ("BF16", [512])
    for n, (shape, dt) in (_CSA_ONLY if i in _CSA else _HCA_ONLY if i in _HCA else {}).items():
      out[f"{p}.{n}"] = (dt, shape)
    if i is not None and i < 3:
      out[f"{p}.ffn.gate.tid2eid"] = ("I64", [129280, 6])
    else:
      out[f"{p}.ffn.gate.bias"] = ("F32", [256])
  for n, (dt, shape) in {
    "e_proj.weight": ("F8_E4M3", [4096, 4096]),
    "e_proj.scale": ("F8_E8M0", [32, 32]),
    "h_proj.weight": ("F8_E4M3", [4096, 4096]),
    "h_proj.scale": ("F8_E8M0", [32, 32]),
    "enorm.weight": ("BF16", [4096]),
    "hnorm.weight": ("BF16", [4096]),
    "norm.weight": ("BF16", [4096]),
    "hc_head_fn": ("F32", [4, 16384]),
    "hc_head_base": ("F32", [4]),
    "hc_head_scale": ("F32", [1]),
  }.items():
    out[f"mtp.0.{n}"] = (dt, shape)
  return out


def test_quantised_export_of_v4_flash_matches_the_published_listing():
  """Names, dtypes and shapes of every tensor (and scale) of DeepSeek-V4-Flash's release."""
  got = {
    n: (d, list(s)) for n, (d, s) in cv.hf_specs(v4.preset("v4_flash"), quantized=True).items()
  }
  want = _flash_listing()
  assert len(want) == 69187  # 67584 routed-expert tensors and scales
  assert sorted(set(got) ^ set(want)) == []
  wrong = {n: (got[n], want[n]) for n in want if got[n] != want[n]}
  assert not wrong, list(wrong.items())[:5]


def test_name_map_matches_transformers_checkpoint():
  """Our plan in the transformers layout names exactly what DeepseekV4ForCausalLM saved."""
  with open(os.path.join(GOLDEN, "config.json")) as f:
    cfg = cv.config_from_hf(json.load(f), has_mtp=False)
  with open(os.path.join(GOLDEN, "model.safetensors.index.json")) as f:
    names = set(json.load(f)["weight_map"])
  assert {e.hf for e in cv.plan(cfg, "transformers")} == names
  by = {e.hub: e.hf for e in cv.plan(cfg, "transformers")}
  assert by["layers.1.attn.kv_norm.weight"] == "model.layers.1.attn.norm.weight"
  assert by["layers.1.attn.compressor.norm.weight"] == "model.layers.1.attn.compressor.norm.weight"
  assert by["hc_head_fn"] == "model.hc_head.hc_fn" and by["head.weight"] == "head.weight"


def test_transformers_config_reads_as_the_hub_form():
  with open(os.path.join(GOLDEN, "config.json")) as f:
    hf = json.load(f)
  cfg = cv.config_from_hf(hf, has_mtp=False)
  assert cfg.compress_ratios == (0, 4, 16, 4) and cfg.n_hash_layers == 1 and cfg.n_mtp_layers == 0
  assert (cfg.rope_head_dim, cfg.rope_factor, cfg.original_seq_len) == (8, 4.0, 32)
  assert (cfg.beta_fast, cfg.beta_slow, cfg.compress_rope_theta, cfg.window_size) == (32, 1, 1e3, 8)
  assert cfg.dtype == "bf16" and cfg.expert_dtype is None  # no quantization_config
  bad = dict(hf, mlp_layer_types=["moe", "hash_moe", "moe", "moe"])
  with pytest.raises(ValueError, match="hash layers must come first"):
    cv.config_from_hf(bad)


@pytest.mark.parametrize("preset", ["v4_test", "v4_flash", "v4_pro"])
def test_hub_config_round_trip(preset):
  cfg = v4.preset(preset)
  for q in (False, True):
    got = cv.config_from_hf(cv.hf_config_dict(cfg, q))
    keep = dict(param_dtype=cfg.param_dtype, init_std=cfg.init_std)
    want = cfg.replace(**(dict(dtype="bf16", scale_fmt=None, expert_dtype=None) if not q else {}))
    assert got.replace(**keep) == want.replace(
      compute_dtype=got.compute_dtype,
      indexer_quant=got.indexer_quant,
      kv_quant=got.kv_quant,
      attn_block_q=got.attn_block_q,
      max_batch_size=got.max_batch_size,
    )


# ------------------------------------------------------------------------------------------------
# Round trips


def test_roundtrip_hub_fp32_is_exact(src, tmp_path):
  cfg, want, hf, _ = src
  cfg2 = cv.hf_to_orbax(hf, str(tmp_path / "o"), progress=False)
  assert cfg2.compress_ratios == cfg.compress_ratios and cfg2.n_mtp_layers == 1
  m = v4.build(cfg2, seed=7)
  checkpoint.load_params(str(tmp_path / "o"), m)
  got = flat(m)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=".".join(k))
  cv.orbax_to_hf(str(tmp_path / "o"), str(tmp_path / "hf2"), progress=False)
  same_dirs(hf, str(tmp_path / "hf2"))


def test_default_export_dtypes(src, tmp_path):
  """Without a recorded source: bf16 weights; fp32 ape / sinks / hyper-connections / router bias;
  int64 hash tables; a hub config.json that reads back as the same architecture."""
  cfg, _, _, _ = src
  cv.orbax_to_hf(
    os.path.join(os.path.dirname(src[2]), "orbax"), str(tmp_path / "h"), cfg=cfg, progress=False
  )
  specs = {n: i.dtype for n, i in safetensors_io.Reader(
    str(tmp_path / "h" / "model-00001-of-00001.safetensors")).infos.items()}  # fmt: skip
  assert specs["layers.0.attn.wq_a.weight"] == specs["layers.1.ffn.experts.3.w1.weight"] == "BF16"
  assert specs["layers.1.attn.compressor.ape"] == specs["layers.2.attn.attn_sink"] == "F32"
  assert specs["layers.1.hc_ffn_fn"] == specs["layers.1.ffn.gate.bias"] == "F32"
  assert specs["layers.0.ffn.gate.tid2eid"] == "I64"
  assert "layers.0.ffn.gate.bias" not in specs and "layers.1.ffn.gate.tid2eid" not in specs
  assert "layers.2.attn.indexer.wq_b.weight" not in specs  # HCA: no indexer
  assert "layers.0.attn.compressor.wkv.weight" not in specs  # window-only: no compressor
  with open(tmp_path / "h" / "config.json") as f:
    cv.check_same_architecture(cv.config_from_hf(json.load(f)), cfg, "export")


def test_import_bf16_storage(src, tmp_path):
  cfg, want, hf, _ = src
  cfg2 = cv.hf_to_orbax(hf, str(tmp_path / "o"), dtype="bf16", progress=False)
  m = v4.build(cfg2)
  checkpoint.load_params(str(tmp_path / "o"), m)
  got = flat(m)
  k = ("layers", "1", "ffn", "w1")
  assert got[k].dtype == jnp.bfloat16
  np.testing.assert_array_equal(got[k], want[k].astype(ml_dtypes.bfloat16))
  ape = ("layers", "1", "attn", "compressor", "ape")
  assert got[ape].dtype == np.float32  # fp32 in the model whatever the storage dtype
  np.testing.assert_array_equal(got[ape], want[ape])


def test_transformers_layout_to_hub_and_back(tmp_path):
  """The golden (transformers' layout) exported as hub layout reads back to the same params."""
  a = cv.hf_to_orbax(GOLDEN, str(tmp_path / "o"), progress=False)
  cv.orbax_to_hf(str(tmp_path / "o"), str(tmp_path / "hub"), layout="hub", progress=False)
  names = set(_read_all(str(tmp_path / "hub")))
  assert "layers.1.attn.kv_norm.weight" in names and "embed.weight" in names
  b = cv.hf_to_orbax(str(tmp_path / "hub"), str(tmp_path / "o2"), progress=False)
  cv.check_same_architecture(b, a, "hub export")
  ma, mb = v4.build(a), v4.build(b, seed=5)
  checkpoint.load_params(str(tmp_path / "o"), ma)
  checkpoint.load_params(str(tmp_path / "o2"), mb)
  fa, fb = flat(ma), flat(mb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=".".join(k))


# ------------------------------------------------------------------------------------------------
# FP8 / FP4


def _fp8_ref(codes, scale):
  s = np.repeat(np.repeat(scale.astype(np.float64), 128, 0), 128, 1)
  return codes.astype(np.float64) * s[: codes.shape[0], : codes.shape[1]]


def _fp4_ref(packed, scale):
  """Independent reference: nibble by nibble through ml_dtypes' float4_e2m1fn."""
  b = packed.view(np.uint8).astype(np.int64)
  lo, hi = (b & 15).astype(np.uint8), (b >> 4).astype(np.uint8)
  f4 = np.dtype(ml_dtypes.float4_e2m1fn)
  vals = np.empty((b.shape[0], 2 * b.shape[1]), np.float64)
  vals[:, 0::2] = lo.view(f4).astype(np.float64)
  vals[:, 1::2] = hi.view(f4).astype(np.float64)
  return vals * np.repeat(scale.astype(np.float64), 32, 1)


def _random_release(tensors, seed=0):
  """Like DeepSeek's release: random e4m3 / packed e2m1 codes with random e8m0 scales."""
  rng = np.random.default_rng(seed)
  for n in list(tensors):
    if not n.endswith(".scale"):
      continue
    w = n[: -len(".scale")] + ".weight"
    codes = rng.integers(0, 256, size=tensors[w].shape, dtype=np.uint8)
    if tensors[w].dtype == E4M3:
      codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes
      tensors[w] = codes.view(E4M3)
    else:
      tensors[w] = codes.view(np.int8)
    tensors[n] = rng.integers(118, 136, size=tensors[n].shape, dtype=np.uint8).view(E8M0)


@pytest.fixture(scope="module")
def release(src, tmp_path_factory):
  root = tmp_path_factory.mktemp("release")
  return _edit_hf(src[3], str(root / "hf8"), _random_release)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_quantised_roundtrip_is_bitwise(release, tmp_path, dtype):
  """HF FP8 + FP4 -> Orbax (dequantised, exact in fp32 and bf16) -> HF FP8 + FP4, file by file."""
  cv.hf_to_orbax(release, str(tmp_path / "o"), dtype=dtype, progress=False)
  cv.orbax_to_hf(str(tmp_path / "o"), str(tmp_path / "back"), quantized=True, progress=False)
  same_dirs(release, str(tmp_path / "back"))
  # Without `quantized` the same checkpoint exports dequantised bf16 weights and no scales.
  cv.orbax_to_hf(str(tmp_path / "o"), str(tmp_path / "bf"), progress=False)
  t = _read_all(str(tmp_path / "bf"))
  assert not any(n.endswith(".scale") for n in t)
  assert t["layers.1.ffn.experts.2.w2.weight"].dtype == ml_dtypes.bfloat16
  with open(tmp_path / "bf" / "config.json") as f:
    assert "quantization_config" not in json.load(f)


def test_dequantisation_values(src, release, tmp_path):
  cfg = src[0]
  cv.hf_to_orbax(release, str(tmp_path / "o"), progress=False)
  m = v4.build(cfg)
  checkpoint.load_params(str(tmp_path / "o"), m)
  got, t = flat(m), _read_all(release)
  n = "layers.1.ffn.experts.3.w2"  # FP4: [D, F/2] int8 + [D, F/32] e8m0
  assert t[n + ".weight"].dtype == np.int8 and t[n + ".scale"].dtype == E8M0
  want = _fp4_ref(t[n + ".weight"], t[n + ".scale"])
  np.testing.assert_array_equal(got[("layers", "1", "ffn", "w2")][3], want.T.astype(np.float32))
  n = "layers.1.attn.wo_b"  # FP8 e4m3 + 128x128 e8m0
  want = _fp8_ref(t[n + ".weight"], t[n + ".scale"])
  np.testing.assert_array_equal(got[("layers", "1", "attn", "wo_b", "kernel")], want.T)
  n = "mtp.0.attn.wo_a"  # grouped: [O·Y, I] -> ours [O, I, Y]
  want = _fp8_ref(t[n + ".weight"], t[n + ".scale"]).reshape(cfg.o_groups, cfg.o_lora_rank, -1)
  np.testing.assert_array_equal(got[("mtp", "block", "attn", "wo_a")], want.transpose(0, 2, 1))


def test_fresh_quantisation_is_stable(src, tmp_path):
  """A trained checkpoint (no recorded scales) gets power-of-two scales; error within e4m3 / e2m1
  rounding; re-import and re-export reproduce the files."""
  cfg, want, _, hf8 = src
  t = _read_all(hf8)
  s = t["layers.1.attn.wq_b.scale"].astype(np.float32)
  assert t["layers.1.attn.wq_b.scale"].dtype == E8M0 and (np.log2(s) % 1 == 0).all()
  assert t["layers.1.ffn.experts.0.w1.weight"].dtype == np.int8
  cv.hf_to_orbax(hf8, str(tmp_path / "o"), progress=False)
  m = v4.build(cfg)
  checkpoint.load_params(str(tmp_path / "o"), m)
  got = flat(m)
  for k, rel in (
    (("layers", "1", "attn", "wq_b", "kernel"), 2.0**-4),
    (("layers", "1", "ffn", "w1"), 0.25),
  ):
    np.testing.assert_allclose(got[k], want[k], atol=np.abs(want[k]).max() * rel)
  k = ("layers", "1", "attn", "compressor", "wkv", "kernel")  # bf16 in the release, not FP8
  np.testing.assert_array_equal(got[k], want[k].astype(ml_dtypes.bfloat16).astype(np.float32))
  cv.orbax_to_hf(str(tmp_path / "o"), str(tmp_path / "h8b"), quantized=True, progress=False)
  same_dirs(hf8, str(tmp_path / "h8b"))


def test_fp4_quantize_recovers_codes():
  rng = np.random.default_rng(0)
  packed = rng.integers(0, 256, size=(64, 48), dtype=np.uint8).view(np.int8)
  s = rng.integers(100, 150, size=(64, 3), dtype=np.uint8).view(E8M0)
  w = cv.dequantize_fp4(packed, s)
  np.testing.assert_array_equal(w, _fp4_ref(packed, s).astype(np.float32))
  for x in (w, w.astype(ml_dtypes.bfloat16)):
    p2, s2 = cv.quantize_fp4(x, s.astype(np.float32))
    np.testing.assert_array_equal(p2, packed)
    np.testing.assert_array_equal(s2, s.astype(np.float32))
  p3, s3 = cv.quantize_fp4(w)  # fresh scales: the smallest power of two covering each block
  np.testing.assert_array_equal(cv.dequantize_fp4(p3, s3), w)


# ------------------------------------------------------------------------------------------------
# transformers' quantised save layout: `model.` names, block scales as `X.weight_scale_inv`


def _tf_name(hub):
  """A hub name as transformers saves it (written out here, independent of cv.to_layout)."""
  if hub == "head.weight":
    return hub
  if hub == "embed.weight":
    return "model.embed_tokens.weight"
  if hub.startswith("hc_head_"):
    return "model.hc_head.hc_" + hub[len("hc_head_") :]
  return "model." + hub.replace(".attn.kv_norm.", ".attn.norm.")


def _tf_release(tensors):
  """The hub release's tensors under transformers' quantised save names; MTP dropped."""
  out = {}
  for n, a in tensors.items():
    if n.startswith("mtp."):
      continue
    if n.endswith(".scale"):
      out[_tf_name(n[: -len(".scale")] + ".weight")[: -len(".weight")] + ".weight_scale_inv"] = a
    else:
      out[_tf_name(n)] = a
  return out


@pytest.fixture(scope="module")
def tf_release(release, tmp_path_factory):
  """The same FP8 + FP4 codes and e8m0 scales as `release`, saved the way transformers does."""
  root = tmp_path_factory.mktemp("tf_release")
  with open(os.path.join(release, "config.json")) as f:
    c = json.load(f)
  return _write_hf(str(root / "hf8"), _tf_release(_read_all(release)), c)


def test_transformers_fp8_roundtrip_and_values(release, tf_release, tmp_path):
  """transformers-layout FP8 + FP4 -> Orbax -> the same directory byte for byte; the values are
  the hub-layout import's of the same codes and scales."""
  t = _read_all(tf_release)
  n = "model.layers.1.attn.wq_b.weight_scale_inv"
  assert t[n].dtype == E8M0 and t["model.layers.1.attn.wq_b.weight"].dtype == E4M3
  assert t["model.layers.1.ffn.experts.0.w1.weight"].dtype == np.int8
  assert not any(k.endswith(".scale") for k in t)
  cfg_tf = cv.hf_to_orbax(tf_release, str(tmp_path / "o_tf"), progress=False)
  cfg_hub = cv.hf_to_orbax(release, str(tmp_path / "o_hub"), progress=False)
  assert cfg_tf.n_mtp_layers == 0 and cfg_hub.n_mtp_layers == 1
  cv.orbax_to_hf(str(tmp_path / "o_tf"), str(tmp_path / "back"), quantized=True, progress=False)
  same_dirs(tf_release, str(tmp_path / "back"))
  m_tf, m_hub = v4.build(cfg_tf, seed=7), v4.build(cfg_hub, seed=8)
  checkpoint.load_params(str(tmp_path / "o_tf"), m_tf)
  checkpoint.load_params(str(tmp_path / "o_hub"), m_hub)
  a, b = flat(m_tf), flat(m_hub)
  assert set(a) == {k for k in b if k[0] != "mtp"}
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=".".join(k))
  # The hub layout from the transformers import: `.scale` names, the release's codes and scales.
  cv.orbax_to_hf(
    str(tmp_path / "o_tf"), str(tmp_path / "hub"), layout="hub", quantized=True, progress=False
  )
  h, r = _read_all(str(tmp_path / "hub")), _read_all(release)
  assert {k for k in r if not k.startswith("mtp.")} == set(h)
  for k in h:
    assert h[k].dtype == r[k].dtype and h[k].tobytes() == r[k].tobytes(), k


def test_transformers_fp8_fresh_export(golden_orbax, tmp_path):
  """transformers' unquantised golden exported with quantized=True: transformers' names and
  config keys, `X.weight_scale_inv` e8m0 scales and a quantization_config; stable on re-import."""
  _, path = golden_orbax
  cv.orbax_to_hf(path, str(tmp_path / "q"), quantized=True, progress=False)
  t = _read_all(str(tmp_path / "q"))
  assert t["model.layers.1.attn.wq_a.weight"].dtype == E4M3
  assert t["model.layers.1.attn.wq_a.weight_scale_inv"].dtype == E8M0
  assert t["model.layers.1.ffn.experts.0.w1.weight"].dtype == np.int8  # in = 32: FP4
  assert t["model.layers.1.ffn.experts.0.w2.weight"].dtype == E4M3  # in = 16: FP8
  assert t["model.layers.1.attn.norm.weight"].dtype == np.float32  # the golden's dtype
  assert not any(k.endswith(".scale") for k in t)
  with open(tmp_path / "q" / "config.json") as f:
    c = json.load(f)
  assert "layer_types" in c and "compress_ratios" not in c
  q = c["quantization_config"]
  assert (q["quant_method"], q["fmt"], q["weight_block_size"]) == ("fp8", "e4m3", [128, 128])
  cv.hf_to_orbax(str(tmp_path / "q"), str(tmp_path / "o"), progress=False)
  cv.orbax_to_hf(str(tmp_path / "o"), str(tmp_path / "q2"), quantized=True, progress=False)
  same_dirs(str(tmp_path / "q"), str(tmp_path / "q2"))


def test_transformers_fp8_with_hub_scale_names(tf_release, tmp_path):
  """transformers' names with the hub's `X.scale` block scales (a save that reverts transformers'
  load-time rename) import to the same values and come back with those names, byte for byte."""

  def edit(t):
    for n in [n for n in t if n.endswith(".weight_scale_inv")]:
      t[n[: -len(".weight_scale_inv")] + ".scale"] = t.pop(n)

  hf = _edit_hf(tf_release, str(tmp_path / "h"), edit)
  cv.hf_to_orbax(hf, str(tmp_path / "o"), progress=False)
  cv.hf_to_orbax(tf_release, str(tmp_path / "o_inv"), progress=False)
  a, b = (orbax_io.Reader(str(tmp_path / d)) for d in ("o", "o_inv"))
  assert a.names and set(a.names) == set(b.names)
  for n in a.names:
    assert a.read(n, ()).tobytes() == b.read(n, ()).tobytes(), n
  cv.orbax_to_hf(str(tmp_path / "o"), str(tmp_path / "back"), quantized=True, progress=False)
  same_dirs(hf, str(tmp_path / "back"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_transformers_fp8_f32_scales_roundtrip(tf_release, tmp_path, dtype):
  """fp32 block scales that are not powers of two (transformers' own FP8 quantiser writes
  amax / 448) come back byte for byte, still F32."""
  rng = np.random.default_rng(3)

  def edit(t):
    for n in [n for n in t if n.endswith(".weight_scale_inv")]:
      if t[n.removesuffix("_scale_inv")].dtype == E4M3:
        s = t[n].astype(np.float32) * rng.uniform(1.01, 1.99, t[n].shape).astype(np.float32)
        t[n] = s

  hf = _edit_hf(tf_release, str(tmp_path / "h"), edit)
  n = "model.layers.1.attn.wo_b.weight_scale_inv"
  s = _read_all(hf)[n]
  assert s.dtype == np.float32 and (np.log2(s) % 1 != 0).all()
  cv.hf_to_orbax(hf, str(tmp_path / "o"), dtype=dtype, progress=False)
  cv.orbax_to_hf(str(tmp_path / "o"), str(tmp_path / "back"), quantized=True, progress=False)
  same_dirs(hf, str(tmp_path / "back"))


def _bad_line(hf_dir, tmp_path, match):
  """One ValueError line matching `match`; nothing left at the output path."""
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=match) as err:
    cv.hf_to_orbax(hf_dir, str(out), progress=False)
  assert "\n" not in str(err.value)
  assert not out.exists() and not leftovers(tmp_path)


_BAD_TF_FP8 = [
  (
    "missing_scale",
    r"wrong dtypes \(1\): \['model\.layers\.1\.attn\.wq_a\.weight: F8_E4M3 without "
    r"model\.layers\.1\.attn\.wq_a\.weight_scale_inv'\]",
  ),
  (
    "scale_for_64_blocks",  # wq_b [128, 32]: one 128x128 block, two 64x64 ones
    r"model\.layers\.1\.attn\.wq_b\.weight_scale_inv: F8_E8M0\[2, 1\] != expected one of "
    r"\('F8_E8M0', 'F32'\)\[1, 1\]",
  ),
  ("block_size_64", r"quantization_config\.weight_block_size=\[64, 64\]: expected \[128, 128\]"),
  ("fmt_e5m2", r"quantization_config\.fmt='e5m2': expected 'e4m3'"),
  ("both_suffixes", r"names block scales both ways: 'model\.layers\.1\.attn\.wo_b\.scale'"),
]


@pytest.mark.parametrize("case, match", _BAD_TF_FP8, ids=[c for c, _ in _BAD_TF_FP8])
def test_bad_transformers_fp8(tf_release, tmp_path, case, match):
  w = "model.layers.1.attn."

  def edit(t):
    if case == "missing_scale":
      del t[w + "wq_a.weight_scale_inv"]
    elif case == "scale_for_64_blocks":
      t[w + "wq_b.weight_scale_inv"] = np.repeat(t[w + "wq_b.weight_scale_inv"], 2, axis=0)
    elif case == "both_suffixes":
      t[w + "wo_b.scale"] = t.pop(w + "wo_b.weight_scale_inv")

  def cfg_edit(c):
    if case == "block_size_64":
      c["quantization_config"]["weight_block_size"] = [64, 64]
    elif case == "fmt_e5m2":
      c["quantization_config"]["fmt"] = "e5m2"

  _bad_line(_edit_hf(tf_release, str(tmp_path / "h"), edit, cfg_edit), tmp_path, match)


# ------------------------------------------------------------------------------------------------
# Parity with transformers' DeepseekV4ForCausalLM (fp32, no fake quantisation)


@pytest.fixture(scope="module")
def golden_orbax(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("golden") / "orbax")
  return cv.hf_to_orbax(GOLDEN, out, progress=False), out


def test_golden_roundtrip_is_byte_identical(golden_orbax, tmp_path):
  """transformers' own shards, index and config come back unchanged."""
  _, path = golden_orbax
  cv.orbax_to_hf(path, str(tmp_path / "hf"), progress=False)
  same_dirs(GOLDEN, str(tmp_path / "hf"))


@pytest.mark.parametrize("topk", [16, 4])  # >= every visible CSA entry (T/4 = 16), and < visible
def test_parity_with_transformers(golden_orbax, topk):
  cfg, path = golden_orbax
  assert cfg.compress_ratios == (0, 4, 16, 4)  # window, CSA, HCA (m = 16), CSA
  cfg = cfg.replace(
    index_topk=topk,
    compute_dtype="float32",
    indexer_quant="none",
    kv_quant="none",
    attn_block_q=16,
  )
  m = v4.build(cfg, seed=3)
  checkpoint.load_params(path, m)
  tokens = jnp.asarray(np.load(os.path.join(GOLDEN, "input_ids.npy")))
  want = np.load(os.path.join(GOLDEN, f"logits_topk{topk}.npy"))
  dense = np.load(os.path.join(GOLDEN, "logits_topk16.npy"))
  assert topk * 4 >= tokens.shape[1] or np.abs(dense - want).max() > 0.1  # really sparse
  got, _ = m(tokens, attention="sparse")
  rel = float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())
  assert rel <= 1e-5, rel


# ------------------------------------------------------------------------------------------------
# Bad input: ValueError naming the offender, nothing left at the output path


def _bad(hf_dir, tmp_path, match, **kw):
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=match):
    cv.hf_to_orbax(hf_dir, str(out), progress=False, **kw)
  assert not out.exists() and not leftovers(tmp_path)


def test_bad_missing_tensor(src, tmp_path):
  hf = _edit_hf(src[2], str(tmp_path / "h"), lambda t: t.pop("layers.1.attn.compressor.ape"))
  _bad(hf, tmp_path, r"missing \(1\): \['layers\.1\.attn\.compressor\.ape'\]")


def test_bad_unexpected_tensor(src, tmp_path):
  def edit(t):  # an indexer in an HCA layer
    t["layers.2.attn.indexer.wq_b.weight"] = t["layers.1.attn.indexer.wq_b.weight"]

  _bad(
    _edit_hf(src[2], str(tmp_path / "h"), edit),
    tmp_path,
    r"unexpected \(1\).*layers\.2\.attn\.indexer",
  )


def test_bad_misshaped_tensor(src, tmp_path):
  n = "layers.2.attn.compressor.ape"  # HCA m = 16: [16, 32]
  hf = _edit_hf(src[2], str(tmp_path / "h"), lambda t: t.__setitem__(n, t[n][:4]))
  _bad(hf, tmp_path, r"wrong shapes.*compressor\.ape: \[4, 32\] != expected \[16, 32\]")


def test_bad_dtypes(src, release, tmp_path):
  def edit(t):
    t["norm.weight"] = t["norm.weight"].astype(np.int32)
    t["layers.1.attn.q_norm.weight"] = t["layers.1.attn.q_norm.weight"].astype(np.int8)
    del t["layers.1.attn.wq_a.scale"]  # FP8 without its block scale
    t["layers.0.ffn.gate.tid2eid"] = t["layers.0.ffn.gate.tid2eid"].astype(np.float32)

  _bad(
    _edit_hf(release, str(tmp_path / "h"), edit),
    tmp_path,
    r"wrong dtypes \(4\).*tid2eid: F32 \(expected one of \('I64', 'I32'\)\).*"
    r"q_norm\.weight: I8 but only Linear weights and experts may be quantised.*"
    r"wq_a\.weight: F8_E4M3 without layers\.1\.attn\.wq_a\.scale.*norm\.weight: I32",
  )


def test_bad_scale(release, tmp_path):
  n = "layers.1.ffn.experts.0.w1.scale"
  hf = _edit_hf(release, str(tmp_path / "h"), lambda t: t.__setitem__(n, t[n][:, :1]))
  _bad(hf, tmp_path, r"experts\.0\.w1\.scale: F8_E8M0\[32, 1\] != expected one of .*\[32, 2\]")


def test_bad_hash_table_and_nonfinite(src, tmp_path):
  def edit(t):
    t["layers.0.ffn.gate.tid2eid"] = t["layers.0.ffn.gate.tid2eid"] + 8  # 8 experts
    t["layers.1.attn.attn_sink"] = t["layers.1.attn.attn_sink"].copy()
    t["layers.1.attn.attn_sink"][2] = np.inf

  _bad(
    _edit_hf(src[2], str(tmp_path / "h"), edit),
    tmp_path,
    r"non-finite.*attn_sink.*hash tables with expert ids outside \[0, 8\).*tid2eid",
  )


def test_bad_config(src, tmp_path):
  def cfg_edit(c):
    c["model_type"] = "deepseek_v32"

  _bad(
    _edit_hf(src[2], str(tmp_path / "h"), lambda t: None, cfg_edit),
    tmp_path,
    "is not 'deepseek_v4'",
  )
  _bad(src[2], tmp_path, r"n_heads: 4 != expected 8", expect=v4.preset("v4_test", n_heads=8))


def test_export_refuses_a_v32_record(tmp_path):
  golden32 = os.path.join(os.path.dirname(GOLDEN), "deepseek_v32_tiny")
  from dsa_jax import convert

  convert.hf_to_orbax(golden32, str(tmp_path / "o"), progress=False)
  with pytest.raises(ValueError, match="converted from a V3.2 checkpoint"):
    cv.orbax_to_hf(str(tmp_path / "o"), str(tmp_path / "hf"), progress=False)


# ------------------------------------------------------------------------------------------------
# CLI: --arch (default: config.json's model_type) picks V3.2 or V4


def test_cli_roundtrip_v4(release, tmp_path):
  out = convert_cli(
    "--direction=hf_to_orbax", f"--hf_dir={release}", f"--orbax_dir={tmp_path / 'o'}"
  )
  assert "V4Config" in out.stdout
  convert_cli(
    "--direction=orbax_to_hf",
    "--fp8_export",
    f"--hf_dir={tmp_path / 'hf'}",
    f"--orbax_dir={tmp_path / 'o'}",
  )
  same_dirs(release, str(tmp_path / "hf"))
  bad = convert_cli(
    "--direction=hf_to_orbax",
    "--arch=v32",
    f"--hf_dir={release}",
    f"--orbax_dir={tmp_path / 'o2'}",
    check=False,
  )
  assert bad.returncode == 2 and "model_type" in bad.stderr
