# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""HF safetensors <-> Orbax conversion (dsa_jax.convert): round trips, FP8, HF parity, bad input.

The parity goldens (tests/goldens/deepseek_v32_tiny) were written by transformers'
DeepseekV32ForCausalLM via experiments/make_hf_goldens.py; these tests read only safetensors + npy.
"""

import json
import os
import shutil
import subprocess
import sys
import zlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from convert_testing import REPO, convert_cli, flat, leftovers, same_dirs

import dsa_jax
from dsa_jax import checkpoint, convert, model
from dsa_jax.convert import common, deepseek_hf, fp8, safetensors_io

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "goldens", "deepseek_v32_tiny")
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
  """Our test-preset model (with MTP), its OCDBT params checkpoint and an fp32 HF export."""
  root = tmp_path_factory.mktemp("src")
  cfg = dsa_jax.preset("test")
  m = model.build(cfg, seed=1)
  checkpoint.save_params(root / "orbax", m)
  convert.orbax_to_hf(str(root / "orbax"), str(root / "hf"), cfg=cfg, dtype="fp32", progress=False)
  return cfg, flat(m), str(root / "hf")


def _edit_hf(src_dir, dst_dir, edit):
  """Copies an HF dir, rewriting its tensors: edit(dict name -> array) mutates the dict."""
  shutil.copytree(src_dir, dst_dir)
  with open(os.path.join(src_dir, "model.safetensors.index.json")) as f:
    wm = json.load(f)["weight_map"]
  tensors = {}
  for fn in sorted(set(wm.values())):
    r = safetensors_io.Reader(os.path.join(src_dir, fn))
    tensors.update({n: r.read(n) for n in r.infos})
    os.remove(os.path.join(dst_dir, fn))
  edit(tensors)
  fn = "model-00001-of-00001.safetensors"
  specs = {n: (safetensors_io.dtype_name(a.dtype), a.shape) for n, a in tensors.items()}
  w = safetensors_io.Writer(os.path.join(dst_dir, fn), specs, {"format": "pt"})
  for n in w.order:
    w.write(n, tensors[n])
  w.close()
  _write_index(dst_dir, {n: fn for n in tensors}, sum(a.nbytes for a in tensors.values()))
  return dst_dir


def _write_index(path, weight_map, total_size):
  common.write_index(path, weight_map, {"total_size": total_size})


# ------------------------------------------------------------------------------------------------
# Name map and round trips


def test_name_map_matches_transformers_checkpoint():
  """Our plan names exactly the tensors transformers' DeepseekV32ForCausalLM saved."""
  with open(os.path.join(GOLDEN, "config.json")) as f:
    cfg = convert.config_from_hf(json.load(f))
  with open(os.path.join(GOLDEN, "model.safetensors.index.json")) as f:
    names = set(json.load(f)["weight_map"])
  assert {e.hf for e in convert.plan(cfg)} == names


def test_plan_has_mtp_layer_and_shared_copies():
  cfg = dsa_jax.preset("test")
  by = {e.hf: e for e in convert.plan(cfg)}
  n = cfg.n_layers
  assert by[f"model.layers.{n}.embed_tokens.weight"].leaf == "embed"
  assert by[f"model.layers.{n}.shared_head.head.weight"].leaf == "head.kernel"
  assert by[f"model.layers.{n}.eh_proj.weight"].leaf == "mtp.eh_proj.kernel"
  assert (
    by[f"model.layers.{n}.self_attn.indexer.wk.weight"].leaf == "mtp.block.attn.indexer.wk.kernel"
  )
  e = by["model.layers.2.mlp.experts.5.down_proj.weight"]
  assert (e.leaf, e.index, e.hook) == ("moe_layers.ffn.w2", (1, 5), "linear")
  assert by["model.layers.1.mlp.gate.e_score_correction_bias"].leaf == "moe_layers.ffn.gate_bias"


def test_roundtrip_hf_orbax_hf_is_exact(src, tmp_path):
  cfg, want, hf = src
  cfg2 = convert.hf_to_orbax(hf, str(tmp_path / "o"), progress=False)
  m = model.build(cfg2, seed=7)
  checkpoint.load_params(str(tmp_path / "o"), m)
  got = flat(m)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=".".join(k))
  convert.orbax_to_hf(str(tmp_path / "o"), str(tmp_path / "hf2"), progress=False)
  same_dirs(hf, str(tmp_path / "hf2"))


def test_import_bf16_storage(src, tmp_path):
  cfg, want, hf = src
  cfg2 = convert.hf_to_orbax(hf, str(tmp_path / "o"), dtype="bf16", progress=False)
  assert cfg2.param_dtype == "bfloat16"
  m = model.build(cfg2)
  checkpoint.load_params(str(tmp_path / "o"), m)
  got = flat(m)
  k = ("moe_layers", "ffn", "w1")
  assert got[k].dtype == jnp.bfloat16
  np.testing.assert_array_equal(got[k], want[k].astype(ml_dtypes.bfloat16))


def test_export_writes_both_mtp_copies(src):
  cfg, want, hf = src
  r = safetensors_io.Reader(os.path.join(hf, "model-00001-of-00001.safetensors"))
  n = cfg.n_layers
  np.testing.assert_array_equal(
    r.read(f"model.layers.{n}.embed_tokens.weight"), r.read("model.embed_tokens.weight")
  )
  np.testing.assert_array_equal(
    r.read(f"model.layers.{n}.shared_head.head.weight"), r.read("lm_head.weight")
  )
  np.testing.assert_array_equal(r.read("lm_head.weight"), want[("head", "kernel")].T)


def test_default_export_is_bf16_with_fp32_router_bias(src, tmp_path):
  _, _, hf = src
  convert.hf_to_orbax(hf, str(tmp_path / "o"), progress=False)
  # Without a recorded source (plain save_params checkpoint) the export is bf16.
  for n in os.listdir(tmp_path / "o"):
    if n == "hf_source":
      shutil.rmtree(tmp_path / "o" / n)
  convert.orbax_to_hf(
    str(tmp_path / "o"), str(tmp_path / "hf"), cfg=dsa_jax.preset("test"), progress=False
  )
  r = safetensors_io.Reader(str(tmp_path / "hf" / "model-00001-of-00001.safetensors"))
  assert r.infos["model.layers.0.self_attn.q_a_proj.weight"].dtype == "BF16"
  assert r.infos["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "F32"
  with open(tmp_path / "hf" / "config.json") as f:
    assert convert.config_from_hf(json.load(f)) == dsa_jax.preset("test").replace(
      compute_dtype="bfloat16", attn_block_q=512
    )


# ------------------------------------------------------------------------------------------------
# FP8


def _random_fp8(tensors, seed=0):
  """Like DeepSeek's release: FP8-eligible weights random e4m3 codes with arbitrary
  fp32 block scales, the other tensors bf16 except the fp32 router bias."""
  rng = np.random.default_rng(seed)
  cfg = dsa_jax.preset("test")
  for e in convert.plan(cfg):
    if not e.fp8_default:
      if not e.hf.endswith("e_score_correction_bias"):
        tensors[e.hf] = tensors[e.hf].astype(ml_dtypes.bfloat16)
      continue
    shape = tensors[e.hf].shape
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes
    tensors[e.hf] = codes.view(E4M3)
    s = rng.lognormal(-6, 1, size=fp8.scale_shape(shape)).astype(np.float32)  # not powers of 2
    tensors[e.hf + "_scale_inv"] = s


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fp8_roundtrip_is_bitwise(src, tmp_path, dtype):
  """HF FP8 -> Orbax (dequantised) -> HF FP8 reproduces every file byte for byte (fp8.py)."""
  _, _, hf = src
  hf8 = _edit_hf(hf, str(tmp_path / "hf8"), _random_fp8)
  with open(os.path.join(hf8, "config.json")) as f:
    c = json.load(f)
  c["quantization_config"] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128],
  }
  with open(os.path.join(hf8, "config.json"), "w") as f:
    json.dump(c, f)
  convert.hf_to_orbax(hf8, str(tmp_path / "o"), dtype=dtype, progress=False)
  convert.orbax_to_hf(str(tmp_path / "o"), str(tmp_path / "back"), fp8_export=True, progress=False)
  same_dirs(hf8, str(tmp_path / "back"))
  # Without --fp8_export the same checkpoint exports dequantised bf16 weights and no scales.
  convert.orbax_to_hf(str(tmp_path / "o"), str(tmp_path / "bf"), progress=False)
  r = safetensors_io.Reader(str(tmp_path / "bf" / "model-00001-of-00001.safetensors"))
  assert not any(n.endswith("_scale_inv") for n in r.infos)
  assert r.infos["model.layers.0.self_attn.wq_a.weight".replace("wq_a", "q_a_proj")].dtype == "BF16"


def test_fp8_dequantisation_values(src, tmp_path):
  _, _, hf = src
  hf8 = _edit_hf(hf, str(tmp_path / "hf8"), _random_fp8)
  convert.hf_to_orbax(hf8, str(tmp_path / "o"), progress=False)
  cfg = dsa_jax.preset("test", n_mtp_layers=1)
  m = model.build(cfg)
  checkpoint.load_params(str(tmp_path / "o"), m)
  r = safetensors_io.Reader(os.path.join(hf8, "model-00001-of-00001.safetensors"))
  name = "model.layers.2.mlp.experts.3.up_proj.weight"
  codes, s = r.read(name), r.read(name + "_scale_inv")
  want = (
    codes.astype(np.float32)
    * np.repeat(np.repeat(s, 128, 0), 128, 1)[: codes.shape[0], : codes.shape[1]]
  )
  np.testing.assert_array_equal(flat(m)[("moe_layers", "ffn", "w3")][1, 3], want.T)


def test_fp8_export_without_source_scales(src, tmp_path):
  """A trained checkpoint (no recorded scales) quantises to amax/448 blocks; re-import is stable."""
  cfg, want, hf = src
  orbax0 = os.path.join(os.path.dirname(hf), "orbax")
  convert.orbax_to_hf(orbax0, str(tmp_path / "h8"), cfg=cfg, fp8_export=True, progress=False)
  with open(tmp_path / "h8" / "config.json") as f:
    assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]
  convert.hf_to_orbax(str(tmp_path / "h8"), str(tmp_path / "o"), progress=False)
  m = model.build(cfg)
  checkpoint.load_params(str(tmp_path / "o"), m)
  w, g = (
    want[("moe_layers", "attn", "wq_b", "kernel")],
    flat(m)[("moe_layers", "attn", "wq_b", "kernel")],
  )
  # e4m3 has 3 mantissa bits: error <= 2^-4 relative, or the subnormal step of its block.
  tol = np.abs(w).max() * 2.0**-4
  np.testing.assert_allclose(g, w, atol=tol)
  np.testing.assert_array_equal(flat(m)[("norm", "weight")], want[("norm", "weight")])  # not FP8
  convert.orbax_to_hf(str(tmp_path / "o"), str(tmp_path / "h8b"), fp8_export=True, progress=False)
  same_dirs(str(tmp_path / "h8"), str(tmp_path / "h8b"))


def test_fp8_quantize_recovers_codes_from_bf16():
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 256, size=(300, 200), dtype=np.uint8)
  codes[(codes & 0x7F) == 0x7F] = 0
  codes = codes.view(E4M3)
  s = rng.lognormal(-5, 2, size=fp8.scale_shape(codes.shape)).astype(np.float32)
  w = fp8.dequantize(codes, s).astype(ml_dtypes.bfloat16)
  c2, s2 = fp8.quantize(w, s)
  np.testing.assert_array_equal(c2.view(np.uint8), codes.view(np.uint8))
  np.testing.assert_array_equal(s2, s)


# ------------------------------------------------------------------------------------------------
# Parity with transformers' DeepseekV32ForCausalLM (fp32, plain indexer)


@pytest.fixture(scope="module")
def golden_orbax(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("golden") / "orbax")
  return convert.hf_to_orbax(GOLDEN, out, progress=False), out


@pytest.mark.parametrize("topk", [64, 8])  # >= L=32 (dense-equivalent) and < L (sparse)
def test_parity_with_transformers(golden_orbax, topk):
  cfg, path = golden_orbax
  cfg = cfg.replace(index_topk=topk, indexer_dtype="float32", compute_dtype="float32")
  m = model.build(cfg, seed=3)
  checkpoint.load_params(path, m)
  tokens = jnp.asarray(np.load(os.path.join(GOLDEN, "input_ids.npy")))
  want = np.load(os.path.join(GOLDEN, f"logits_topk{topk}.npy"))
  assert (
    topk >= tokens.shape[1]
    or np.abs(np.load(os.path.join(GOLDEN, "logits_topk64.npy")) - want).max() > 0.1
  )  # really sparse
  got, _ = m(tokens, attention="sparse")
  rel = float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())
  assert rel <= 1e-4, rel


def test_golden_roundtrip_is_byte_identical(golden_orbax, tmp_path):
  """transformers' own shards, index and config come back unchanged."""
  _, path = golden_orbax
  convert.orbax_to_hf(path, str(tmp_path / "hf"), progress=False)
  same_dirs(GOLDEN, str(tmp_path / "hf"))


# ------------------------------------------------------------------------------------------------
# Dense (V3.1) -> DSA


def _dense_v31(src_hf, dst):
  def drop(t):
    for n in [n for n in t if ".indexer." in n]:
      del t[n]

  _edit_hf(src_hf, dst, drop)
  with open(os.path.join(dst, "config.json")) as f:
    c = json.load(f)
  for k in ("index_n_heads", "index_head_dim", "index_topk"):
    c.pop(k)
  c.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"])
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(c, f)
  return dst


def test_dense_v31_import_initialises_indexers(src, tmp_path):
  cfg, want, hf = src
  v31 = _dense_v31(hf, str(tmp_path / "v31"))
  idx = dict(
    index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk
  )
  cfg2 = convert.hf_to_orbax(v31, str(tmp_path / "o"), overrides=idx, progress=False)
  m = model.build(cfg2, seed=9)
  checkpoint.load_params(str(tmp_path / "o"), m)
  got = flat(m)
  for k in want:
    if "indexer" not in k:
      np.testing.assert_array_equal(got[k], want[k])
  wq = got[("moe_layers", "attn", "indexer", "wq_b", "kernel")]
  assert abs(wq.std() - cfg.init_std) < 0.2 * cfg.init_std  # the model's normal(init_std) init
  np.testing.assert_array_equal(got[("mtp", "block", "attn", "indexer", "k_norm", "weight")], 1.0)
  np.testing.assert_array_equal(got[("dense_layers", "attn", "indexer", "k_norm", "bias")], 0.0)
  logits, aux = m(jnp.zeros((1, 24), jnp.int32), attention="dense", indexer_loss="dense")
  assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(aux["indexer_kl"])).all()
  # Exported as a V3.2 (DSA) checkpoint with the new indexer tensors.
  convert.orbax_to_hf(str(tmp_path / "o"), str(tmp_path / "hf"), progress=False)
  with open(tmp_path / "hf" / "config.json") as f:
    c = json.load(f)
  assert c["model_type"] == "deepseek_v32" and c["index_n_heads"] == cfg.index_n_heads
  with open(tmp_path / "hf" / "model.safetensors.index.json") as f:
    assert "model.layers.0.self_attn.indexer.wq_b.weight" in json.load(f)["weight_map"]


# ------------------------------------------------------------------------------------------------
# Bad input: ValueError naming the offenders, nothing left at the output path


def _bad(hf_dir, tmp_path, match, **kw):
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=match):
    convert.hf_to_orbax(hf_dir, str(out), progress=False, **kw)
  assert not out.exists() and not leftovers(tmp_path)


def test_bad_missing_tensor(src, tmp_path):
  hf = _edit_hf(
    src[2], str(tmp_path / "h"), lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight")
  )
  _bad(hf, tmp_path, r"missing \(1\).*experts\.3\.up_proj")


def test_bad_unexpected_tensor(src, tmp_path):
  hf = _edit_hf(
    src[2],
    str(tmp_path / "h"),
    lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", np.zeros(3, np.float32)),
  )
  _bad(hf, tmp_path, r"unexpected \(1\).*self_attn\.extra\.weight")


def test_bad_misshaped_tensor(src, tmp_path):
  name = "model.layers.2.self_attn.o_proj.weight"
  hf = _edit_hf(src[2], str(tmp_path / "h"), lambda t: t.__setitem__(name, t[name][:, :-1]))
  _bad(hf, tmp_path, r"wrong shapes.*o_proj\.weight: \[64, 63\] != expected \[64, 64\]")


def test_bad_dtype(src, tmp_path):
  def edit(t):
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
    t["lm_head.weight"] = t["lm_head.weight"].astype(E4M3)  # FP8 without a block scale

  hf = _edit_hf(src[2], str(tmp_path / "h"), edit)
  _bad(
    hf, tmp_path, r"wrong dtypes \(2\).*lm_head\.weight: F8_E4M3 without.*model\.norm\.weight: I32"
  )


def test_bad_config_mismatch(src, tmp_path):
  _bad(src[2], tmp_path, r"n_heads: 4 != expected 8", expect=dsa_jax.preset("test", n_heads=8))


def test_bad_config_unrepresentable(src, tmp_path):
  hf = shutil.copytree(src[2], tmp_path / "h")
  with open(hf / "config.json") as f:
    c = json.load(f)
  c["hidden_size"] = 32  # every tensor with the model dim is now mis-shaped
  with open(hf / "config.json", "w") as f:
    json.dump(c, f)
  _bad(
    str(hf),
    tmp_path,
    r"wrong shapes.*model\.embed_tokens\.weight: \[256, 64\] != expected \[256, 32\]",
  )


def test_bad_truncated_shard(src, tmp_path):
  hf = shutil.copytree(src[2], tmp_path / "h")
  p = hf / "model-00001-of-00001.safetensors"
  os.truncate(p, os.path.getsize(p) - 100)
  _bad(str(hf), tmp_path, r"model-00001-of-00001.safetensors is truncated or corrupt")


def test_bad_corrupt_header(src, tmp_path):
  hf = shutil.copytree(src[2], tmp_path / "h")
  p = hf / "model-00001-of-00001.safetensors"
  with open(p, "r+b") as f:
    f.seek(8)
    f.write(b"#garbage#")
  _bad(str(hf), tmp_path, r"model-00001-of-00001.safetensors is truncated or corrupt")


def test_bad_corrupt_data_nonfinite(src, tmp_path):
  name = "model.layers.1.self_attn.kv_b_proj.weight"

  def edit(t):
    t[name] = t[name].copy()
    t[name][3, 4] = np.nan

  hf = _edit_hf(src[2], str(tmp_path / "h"), edit)
  _bad(hf, tmp_path, r"non-finite.*kv_b_proj")


def test_bad_mtp_copy_differs(src, tmp_path):
  name = f"model.layers.{src[0].n_layers}.embed_tokens.weight"
  hf = _edit_hf(src[2], str(tmp_path / "h"), lambda t: t.__setitem__(name, t[name] + 1))
  _bad(hf, tmp_path, r"MTP copies.*layers\.3\.embed_tokens")


def test_bad_missing_shard_file(src, tmp_path):
  hf = shutil.copytree(src[2], tmp_path / "h")
  os.remove(hf / "model-00001-of-00001.safetensors")
  _bad(str(hf), tmp_path, r"missing shard files.*model-00001-of-00001")


def test_bad_output_exists(src, tmp_path):
  (tmp_path / "out").mkdir()
  with pytest.raises(ValueError, match="already exists"):
    convert.hf_to_orbax(src[2], str(tmp_path / "out"), progress=False)


def test_bad_orbax_does_not_match_config(src, tmp_path):
  orbax0 = os.path.join(os.path.dirname(src[2]), "orbax")
  with pytest.raises(ValueError, match=r"wrong shapes.*moe_layers\.ffn\.w1"):
    convert.orbax_to_hf(
      orbax0, str(tmp_path / "hf"), cfg=dsa_jax.preset("test", moe_inter_dim=16), progress=False
    )
  assert not (tmp_path / "hf").exists() and not leftovers(tmp_path)


def test_failure_midway_leaves_nothing(src, tmp_path, monkeypatch):
  """A crash while streaming removes the temp dir; the output path never appears."""

  def boom(*a, **k):
    raise ValueError("injected failure")

  monkeypatch.setattr(common, "write_sidecar", boom)
  _bad(src[2], tmp_path, "injected failure")


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_roundtrip(src, tmp_path):
  convert_cli("--direction=hf_to_orbax", f"--hf_dir={src[2]}", f"--orbax_dir={tmp_path / 'o'}")
  convert_cli(
    "--direction=orbax_to_hf", f"--hf_dir={tmp_path / 'hf'}", f"--orbax_dir={tmp_path / 'o'}"
  )
  same_dirs(src[2], str(tmp_path / "hf"))


# ------------------------------------------------------------------------------------------------
# Streaming: peak host memory on a multi-GB checkpoint (a measurement; WORKSPACE.md lab log,
# checkpoint conversion)

# ~1.13B parameters: 2.3 GB of bf16 safetensors; the largest stacked leaf (moe_layers.ffn.w1, fp32)
# is 0.8 GB, the whole fp32 model 4.5 GB, the largest single tensor (embed / head) 0.27 GB in fp32.
WIDE = dict(
  vocab_size=32768,
  dim=2048,
  inter_dim=5632,
  moe_inter_dim=1024,
  n_layers=4,
  n_dense_layers=1,
  n_heads=16,
  n_routed_experts=32,
  n_activated_experts=4,
  n_expert_groups=4,
  n_limited_groups=2,
  q_lora_rank=512,
  kv_lora_rank=256,
  qk_nope_head_dim=64,
  qk_rope_head_dim=32,
  v_head_dim=64,
  index_n_heads=8,
  index_head_dim=64,
)


def _synthetic_hf(cfg, path, shard_bytes=1 << 30):
  """Streams a random bf16 HF checkpoint for cfg to path, one tensor in memory at a time."""
  os.makedirs(path)
  leaves = deepseek_hf.leaf_specs(cfg)
  specs = {}
  for e in convert.plan(cfg):
    shape = deepseek_hf.HOOKS[e.hook].hf_shape(leaves[e.leaf][0][len(e.index) :])
    specs[e.hf] = ("F32" if e.hf.endswith("correction_bias") else "BF16", shape)
  files = common.assign_shards(specs, {}, shard_bytes)
  by = {e.hf: e for e in convert.plan(cfg)}
  for fn, names in files.items():
    w = safetensors_io.Writer(
      os.path.join(path, fn), {n: specs[n] for n in names}, {"format": "pt"}
    )
    for n in w.order:
      e = by[n]
      seed = zlib.crc32(f"{e.leaf}{e.index}".encode())  # the MTP copies come out equal
      x = np.random.default_rng(seed).standard_normal(specs[n][1], dtype=np.float32) * 0.02
      w.write(n, x.astype(safetensors_io.DTYPES[specs[n][0]]))
      del x
    w.close()
  _write_index(
    path,
    {n: fn for fn, ns in files.items() for n in ns},
    sum(common.nbytes(*v) for v in specs.values()),
  )
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(convert.hf_config_dict(cfg), f)


_MEASURE = """
import sys, time
from dsa_jax import convert
def hwm():  # this process's peak RSS in KiB (ru_maxrss would include the pre-exec pytest process)
  return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
base = hwm()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
t = time.time()
if sys.argv[1] == "hf_to_orbax":
  convert.hf_to_orbax(sys.argv[2], sys.argv[3], progress=False)
else:
  convert.orbax_to_hf(sys.argv[2], sys.argv[3], progress=False)
print(base, hwm(), time.time() - t)
"""


@pytest.mark.slow
def test_streaming_peak_rss(tmp_path):
  cfg = dsa_jax.preset("debug", **WIDE)
  _synthetic_hf(cfg, str(tmp_path / "hf"))
  hf_bytes = sum(os.path.getsize(tmp_path / "hf" / f) for f in os.listdir(tmp_path / "hf"))
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  rows = {}
  for direction, a, b in (("hf_to_orbax", "hf", "o"), ("orbax_to_hf", "o", "hf2")):
    out = subprocess.run(
      [sys.executable, "-c", _MEASURE, direction, str(tmp_path / a), str(tmp_path / b)],
      env=env,
      capture_output=True,
      text=True,
      check=True,
    )
    base, peak, secs = out.stdout.split()
    rows[direction] = (int(base) / 2**20, int(peak) / 2**20, float(secs))
    print(
      f"{direction}: checkpoint {hf_bytes / 2**30:.2f} GiB, peak RSS {rows[direction][1]:.2f}"
      f" GiB (after imports {rows[direction][0]:.2f} GiB), {rows[direction][2]:.0f} s"
    )
  same_dirs(str(tmp_path / "hf"), str(tmp_path / "hf2"))
  for _, peak, _ in rows.values():
    assert peak < 2.0  # GiB; the fp32 model is 4.5 GiB, its largest stacked leaf 0.8 GiB
