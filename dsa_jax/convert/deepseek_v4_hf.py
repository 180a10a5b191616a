# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Hugging Face DeepSeek-V4 safetensors <-> dsa_jax.v4 Orbax params checkpoints (docs/v4.md
§Conversion).

Two directory layouts are read and written:

- "hub" (canonical): DeepSeek's release (`embed.weight`, `layers.{i}.attn.wq_a.weight` +
  `layers.{i}.attn.wq_a.scale`, `mtp.0.*`, `hc_head_fn`, ...): FP8 e4m3 Linear weights with e8m0
  128x128 block scales, routed experts FP4 e2m1 packed two per int8 byte with one e8m0 scale per 32
  inputs, bf16 norms / embeddings / compressors, fp32 `ape`, sinks, hyper-connections and router
  bias, int64 hash tables.
- "transformers": what `DeepseekV4ForCausalLM.save_pretrained` writes: the hub names under a
  `model.` prefix, except `model.embed_tokens.weight`, `model.hc_head.hc_{fn,base,scale}`, the
  attention's `attn.norm.weight` (the hub's `attn.kv_norm.weight`) and an unprefixed `head.weight`;
  no MTP tensors; a config.json with `layer_types` / `compress_rates` / `rope_parameters` instead of
  the hub's `compress_ratios` / `rope_scaling`. Quantised, each FP8 / FP4 weight's block scale is
  `X.weight_scale_inv` (the name of the scale parameter in transformers' fine-grained FP8 modules)
  instead of the hub's `X.scale`, and config.json carries a `quantization_config` (`quant_method`
  "fp8", `fmt` "e4m3", `weight_block_size` [128, 128], `scale_fmt` "ue8m0"); both suffixes are
  read in either layout (one per checkpoint) and an export keeps the source's.

`plan(cfg, layout)` lists every HF tensor with our leaf path, a hook that maps the tensor onto our
array and back, and its dtype class. Both directions stream one tensor at a time through the
helpers shared with the V3.2 converter (`safetensors_io`, `orbax_io`, `common`). Import keeps the
source's config, dtypes, shard layout and quantisation scales under `<orbax_dir>/hf_source/`, so an
export reproduces the source directory byte for byte (quantised tensors too, with `quantized=True`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import ml_dtypes
import numpy as np

from dsa_jax import v4
from dsa_jax.convert import common, fp8, orbax_io, safetensors_io
from dsa_jax.v4 import config as v4_config

ARCH = "deepseek_v4"
LAYOUTS = ("hub", "transformers")
FP4_BLOCK = 32
# e2m1 code (low 3 bits; bit 3 = sign) -> value.
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
FP4_MAX = 6.0
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)

# ------------------------------------------------------------------------------------------------
# Name map (hub names). Value: (our leaf path, hook, dtype class).
# {P}: "layers.{i}" (our "layers.{i}") or the MTP block "mtp.0" (our "mtp.block"); {e}: expert.
# Classes: "fp8" Linear weights FP8 in the release, "expert" routed experts (FP4 in the release),
# "bf16" / "f32" kept in that dtype by the release, "table" the int64 hash-routing tables.
# Entries whose leaf the model lacks (no compressor in window-only layers, no indexer in HCA layers,
# tid2eid only in hash layers, gate.bias only in learned ones) are left out by `plan`.


def _hc(hub: str, leaf: str) -> dict[str, tuple[str, str, str]]:
  """A hyper-connection's fp32 mixing weights (`fn`, a Linear), bias and scales."""
  return {
    f"{hub}_fn": (f"{leaf}.fn", "linear", "f32"),
    f"{hub}_base": (f"{leaf}.base", "copy", "f32"),
    f"{hub}_scale": (f"{leaf}.scale", "copy", "f32"),
  }


TOP: dict[str, tuple[str, str, str]] = {
  "embed.weight": ("embed", "copy", "bf16"),
}
TOP_END: dict[str, tuple[str, str, str]] = {
  "norm.weight": ("norm.weight", "copy", "bf16"),
  **_hc("hc_head", "hc_head"),
  "head.weight": ("head.kernel", "linear", "bf16"),
}
BLOCK: dict[str, tuple[str, str, str]] = {
  "{P}.attn_norm.weight": ("{L}.attn_norm.weight", "copy", "bf16"),
  "{P}.ffn_norm.weight": ("{L}.ffn_norm.weight", "copy", "bf16"),
  **_hc("{P}.hc_attn", "{L}.hc_attn"),
  **_hc("{P}.hc_ffn", "{L}.hc_ffn"),
  # Attention (all layer types).
  "{P}.attn.attn_sink": ("{L}.attn.attn_sink", "copy", "f32"),
  "{P}.attn.wq_a.weight": ("{L}.attn.wq_a.kernel", "linear", "fp8"),
  "{P}.attn.q_norm.weight": ("{L}.attn.q_norm.weight", "copy", "bf16"),
  "{P}.attn.wq_b.weight": ("{L}.attn.wq_b.kernel", "linear", "fp8"),
  "{P}.attn.wkv.weight": ("{L}.attn.wkv.kernel", "linear", "fp8"),
  "{P}.attn.kv_norm.weight": ("{L}.attn.kv_norm.weight", "copy", "bf16"),
  "{P}.attn.wo_a.weight": ("{L}.attn.wo_a", "grouped", "fp8"),
  "{P}.attn.wo_b.weight": ("{L}.attn.wo_b.kernel", "linear", "fp8"),
  # KV compressor (CSA and HCA layers).
  "{P}.attn.compressor.wkv.weight": ("{L}.attn.compressor.wkv.kernel", "linear", "bf16"),
  "{P}.attn.compressor.wgate.weight": ("{L}.attn.compressor.wgate.kernel", "linear", "bf16"),
  "{P}.attn.compressor.ape": ("{L}.attn.compressor.ape", "copy", "f32"),
  "{P}.attn.compressor.norm.weight": ("{L}.attn.compressor.norm.weight", "copy", "bf16"),
  # Lightning indexer (CSA layers) with its own compressor.
  "{P}.attn.indexer.wq_b.weight": ("{L}.attn.indexer.wq_b.kernel", "linear", "fp8"),
  "{P}.attn.indexer.weights_proj.weight": (
    "{L}.attn.indexer.weights_proj.kernel",
    "linear",
    "bf16",
  ),
  "{P}.attn.indexer.compressor.wkv.weight": (
    "{L}.attn.indexer.compressor.wkv.kernel",
    "linear",
    "bf16",
  ),
  "{P}.attn.indexer.compressor.wgate.weight": (
    "{L}.attn.indexer.compressor.wgate.kernel",
    "linear",
    "bf16",
  ),
  "{P}.attn.indexer.compressor.ape": ("{L}.attn.indexer.compressor.ape", "copy", "f32"),
  "{P}.attn.indexer.compressor.norm.weight": (
    "{L}.attn.indexer.compressor.norm.weight",
    "copy",
    "bf16",
  ),
  # MoE: router (+ selection bias, or the hash table), routed experts [E, ...], shared expert.
  "{P}.ffn.gate.weight": ("{L}.ffn.gate.kernel", "linear", "bf16"),
  "{P}.ffn.gate.bias": ("{L}.ffn.gate_bias", "copy", "f32"),
  "{P}.ffn.gate.tid2eid": ("{L}.ffn.tid2eid", "table", "table"),
  "{P}.ffn.experts.{e}.w1.weight": ("{L}.ffn.w1[{e}]", "linear", "expert"),
  "{P}.ffn.experts.{e}.w2.weight": ("{L}.ffn.w2[{e}]", "linear", "expert"),
  "{P}.ffn.experts.{e}.w3.weight": ("{L}.ffn.w3[{e}]", "linear", "expert"),
  "{P}.ffn.shared_experts.w1.weight": ("{L}.ffn.shared_experts.w1.kernel", "linear", "fp8"),
  "{P}.ffn.shared_experts.w2.weight": ("{L}.ffn.shared_experts.w2.kernel", "linear", "fp8"),
  "{P}.ffn.shared_experts.w3.weight": ("{L}.ffn.shared_experts.w3.kernel", "linear", "fp8"),
}
MTP: dict[str, tuple[str, str, str]] = {
  "mtp.0.e_proj.weight": ("mtp.e_proj.kernel", "linear", "fp8"),
  "mtp.0.h_proj.weight": ("mtp.h_proj.kernel", "linear", "fp8"),
  "mtp.0.enorm.weight": ("mtp.enorm.weight", "copy", "bf16"),
  "mtp.0.hnorm.weight": ("mtp.hnorm.weight", "copy", "bf16"),
  "mtp.0.norm.weight": ("mtp.norm.weight", "copy", "bf16"),
  **_hc("mtp.0.hc_head", "mtp.hc_head"),
}


def _grouped_to_ours(x, o: int):
  """wo_a: HF [O·Y, I] (group-major rows) -> ours [O, I, Y]."""
  return x.reshape(o, -1, x.shape[1]).transpose(0, 2, 1)


Hook = common.Hook  # to_ours / to_hf take (tensor, cfg)

HOOKS = {
  "copy": Hook(lambda x, c: x, lambda x, c: x, tuple),
  # torch Linear weights are [out, in]; our kernels are [in, out].
  "linear": Hook(lambda x, c: x.T, lambda x, c: x.T, lambda s: tuple(reversed(s))),
  "grouped": Hook(
    lambda x, c: _grouped_to_ours(x, c.o_groups),
    lambda x, c: x.transpose(0, 2, 1).reshape(-1, x.shape[1]),
    lambda s: (s[0] * s[2], s[1]),
  ),
  # int64 in checkpoints, int32 in the model (expert ids < 2^31).
  "table": Hook(lambda x, c: x.astype(np.int32), lambda x, c: x, tuple),
}

SCALE_SUFFIX = ".scale"  # the hub's block-scale name: X.weight -> X.scale
TF_SCALE_SUFFIX = ".weight_scale_inv"  # transformers' FP8 modules: X.weight -> X.weight_scale_inv
SCALE_SUFFIXES = {"hub": SCALE_SUFFIX, "transformers": TF_SCALE_SUFFIX}
_FLOAT = ("F32", "BF16", "F16")
_INT = ("I64", "I32")
_QUANT = ("F8_E4M3", "I8")
_SCALE_DTYPES = ("F8_E8M0", "F32")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor <-> one slice `leaf[index]` of our parameter tree."""

  hf: str  # name in the plan's layout
  hub: str  # name in the hub layout
  leaf: str
  index: tuple[int, ...]
  hook: str
  cls: str
  scale_suffix: str = SCALE_SUFFIX

  @property
  def scale(self) -> str:
    """The name of this weight's block scale (`X.weight` -> `X.scale` or `X.weight_scale_inv`)."""
    return scale_name(self.hf, self.scale_suffix)


def scale_name(weight: str, suffix: str) -> str:
  """`X.weight` -> `X` + suffix (`.scale` or `.weight_scale_inv`)."""
  return weight.removesuffix(".weight") + suffix


# ------------------------------------------------------------------------------------------------
# Layouts


def to_layout(hub: str, layout: str) -> str:
  """A hub tensor name in `layout`."""
  if layout == "hub" or hub.startswith("mtp."):
    return hub
  if hub == "head.weight":
    return hub
  if hub == "embed.weight":
    return "model.embed_tokens.weight"
  if hub.startswith("hc_head_"):
    return "model.hc_head.hc_" + hub[len("hc_head_") :]
  m = re.fullmatch(r"layers\.(\d+)\.attn\.kv_norm\.weight", hub)
  if m:
    return f"model.layers.{m[1]}.attn.norm.weight"
  return "model." + hub


def detect_layout(names) -> str:
  """ "transformers" if any tensor carries transformers' `model.` prefix, else "hub"."""
  return "transformers" if any(n.startswith("model.") for n in names) else "hub"


def detect_scale_suffix(names, layout: str, where: str = "HF checkpoint") -> str:
  """The block-scale suffix a checkpoint uses: `.scale` (the hub's) or `.weight_scale_inv`
  (transformers'), found from the scales that sit beside an `X.weight`; the layout's own without
  any. Raises if both occur."""
  names = set(names)
  found = {
    suf: sorted(n for n in names if n.endswith(suf) and n[: -len(suf)] + ".weight" in names)
    for suf in (SCALE_SUFFIX, TF_SCALE_SUFFIX)
  }
  if found[SCALE_SUFFIX] and found[TF_SCALE_SUFFIX]:
    raise ValueError(
      f"{where} names block scales both ways: {found[SCALE_SUFFIX][0]!r} and "
      f"{found[TF_SCALE_SUFFIX][0]!r}; expected one suffix, {SCALE_SUFFIX!r} or "
      f"{TF_SCALE_SUFFIX!r}"
    )
  for suf in (SCALE_SUFFIX, TF_SCALE_SUFFIX):
    if found[suf]:
      return suf
  return SCALE_SUFFIXES[layout]


QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
_SCALE_FMTS = ("ue8m0", None)


def check_quantization_config(hf: dict, where: str = "HF config") -> None:
  """Raises unless config.json's `quantization_config` (if any) describes the formats read here:
  FP8 e4m3 with 128x128 block scales (`scale_fmt` ue8m0 or unset)."""
  q = hf.get("quantization_config")
  if q is None:
    return
  if not isinstance(q, dict):
    raise ValueError(f"{where} quantization_config={q!r}: expected a dict")
  for k, want in QUANT_CONFIG.items():
    got = q.get(k, want if k == "fmt" else None)
    if isinstance(got, tuple):
      got = list(got)
    if got != want:
      raise ValueError(f"{where} quantization_config.{k}={got!r}: expected {want!r}")
  if q.get("scale_fmt") not in _SCALE_FMTS:
    raise ValueError(
      f"{where} quantization_config.scale_fmt={q['scale_fmt']!r}: expected one of {_SCALE_FMTS}"
    )


def raw_config(hf: dict, has_mtp: bool | None = None) -> dict:
  """An HF config dict in the hub's raw form (`compress_ratios`, `num_hash_layers`,
  `rope_scaling`, `qk_rope_head_dim`), converting transformers' saved form if needed.

  has_mtp: whether the checkpoint holds MTP tensors (transformers never saves them; its config
  still says `num_nextn_predict_layers: 1`). None: trust the config.
  """
  out = dict(hf)
  if out.get("model_type") != ARCH:
    raise ValueError(f"HF config model_type={out.get('model_type')!r} is not {ARCH!r}")
  if has_mtp is False:
    out["num_nextn_predict_layers"] = 0
    # A hub-form config beside transformers' names (e.g. our export of a hub import in that
    # layout) still lists the MTP block's ratio after the main layers'.
    n = out.get("num_hidden_layers")
    if isinstance(out.get("compress_ratios"), list) and isinstance(n, int):
      out["compress_ratios"] = out["compress_ratios"][:n]
  if "compress_ratios" not in out and "layer_types" in out:
    rates = {
      "sliding_attention": 0,
      "compressed_sparse_attention": 4,
      "heavily_compressed_attention": 128,
      **(out.get("compress_rates") or {}),
    }
    if rates["compressed_sparse_attention"] != 4:
      raise ValueError(f"HF config compress_rates={rates}: CSA layers need ratio 4")
    ratios = [rates[t] for t in out["layer_types"]]
    out["compress_ratios"] = ratios + [0] * int(out.get("num_nextn_predict_layers", 0))
  mlp = out.get("mlp_layer_types")
  if "num_hash_layers" not in out and mlp is not None:
    n = sum(1 for _ in itertools.takewhile(lambda t: t == "hash_moe", mlp))
    if "hash_moe" in mlp[n:]:
      raise ValueError(f"HF config mlp_layer_types={mlp}: hash layers must come first")
    out["num_hash_layers"] = n
  if "qk_rope_head_dim" not in out and "partial_rotary_factor" in out:
    out["qk_rope_head_dim"] = int(round(out["head_dim"] * out["partial_rotary_factor"]))
  rp = out.get("rope_parameters")
  if "rope_scaling" not in out and isinstance(rp, dict) and isinstance(rp.get("compress"), dict):
    comp, main = rp["compress"], rp.get("main") or {}
    if main.get("rope_theta", out.get("rope_theta")) != out.get("rope_theta") or comp.get(
      "rope_theta", out.get("compress_rope_theta")
    ) != out.get("compress_rope_theta"):
      raise ValueError(
        f"HF config rope_parameters={rp} disagree with rope_theta/compress_rope_theta"
      )
    if main.get("rope_type", "default") != "default":
      raise ValueError(f"HF config rope_parameters.main={main}: window layers use plain RoPE")
    if comp.get("rope_type") == "yarn":
      if comp.get("attention_factor", 1.0) != 1.0:
        raise ValueError(f"HF config rope_parameters.compress={comp}: V4 has no YaRN mscale")
      keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
      out["rope_scaling"] = {"type": "yarn", **{k: comp[k] for k in keys if k in comp}}
    elif comp.get("rope_type", "default") != "default":
      raise ValueError(f"HF config rope_parameters.compress={comp}: expected yarn or default")
    else:  # no YaRN: original_seq_len 0 turns it off
      out["rope_scaling"] = {"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 0}
  for k, want in (("mlp_bias", False), ("router_jitter_noise", 0.0)):
    if k in out:
      if out[k] != want:
        raise ValueError(f"HF config key {k!r}={out[k]!r} cannot be represented: needs {want!r}")
      del out[k]
  for k in ("layer_types", "compress_rates", "mlp_layer_types", "rope_parameters"):
    out.pop(k, None)
  return out


def config_from_hf(hf: dict, has_mtp: bool | None = None, **overrides) -> v4.V4Config:
  """V4Config of a DeepSeek-V4 HF config dict (hub or transformers form)."""
  return v4.V4Config.from_hf_config(raw_config(hf, has_mtp), **overrides)


def hf_config_dict(cfg: v4.V4Config, quantized: bool = False) -> dict:
  """The hub-form config.json of cfg (what DeepSeek's release ships); `config_from_hf` inverts it."""
  inv = {ours: k for k, ours in v4_config._HF_MAP.items()}
  d: dict = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": ARCH}
  for f, k in sorted(inv.items(), key=lambda kv: kv[1]):
    v = getattr(cfg, f)
    d[k] = list(v) if isinstance(v, tuple) else v
  d.update(v4_config._HF_REQUIRED)
  d["rope_scaling"] = {
    "type": "yarn",
    "factor": cfg.rope_factor,
    "original_max_position_embeddings": cfg.original_seq_len,
    "beta_fast": cfg.beta_fast,
    "beta_slow": cfg.beta_slow,
  }
  if quantized:
    q = {
      "activation_scheme": "dynamic",
      "fmt": "e4m3",
      "quant_method": "fp8",
      "scale_fmt": cfg.scale_fmt or "ue8m0",
      "weight_block_size": [128, 128],
    }
    if cfg.expert_dtype is not None:
      q["expert_dtype"] = cfg.expert_dtype
    d["quantization_config"] = q
  d["torch_dtype"] = "bfloat16"
  return d


# ------------------------------------------------------------------------------------------------
# Plan


def leaf_specs(cfg: v4.V4Config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Our state's leaves {dotted path: (shape, dtype)} (parameters, router biases, hash tables)."""
  return common.leaf_specs(v4.abstract(cfg))


def plan(
  cfg: v4.V4Config, layout: str = "hub", leaves=None, scale_suffix: str | None = None
) -> list[Entry]:
  """Every HF tensor of a checkpoint for `cfg` in `layout`, in the hub's order.

  scale_suffix: how quantised weights name their block scales; default: the layout's (`.scale` in
  the hub's, `.weight_scale_inv` in transformers')."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
  leaves = leaf_specs(cfg) if leaves is None else leaves
  suffix = scale_suffix or SCALE_SUFFIXES[layout]
  out: list[Entry] = []

  def add(hub, leaf, hook, cls, index=()):
    if leaf in leaves:
      out.append(Entry(to_layout(hub, layout), hub, leaf, index, hook, cls, suffix))

  for hub, (leaf, hook, cls) in TOP.items():
    add(hub, leaf, hook, cls)
  blocks = [(f"layers.{i}", f"layers.{i}") for i in range(cfg.n_layers)]
  for p, root in blocks + ([("mtp.0", "mtp.block")] if cfg.n_mtp_layers else []):
    if p == "mtp.0":
      for hub, (leaf, hook, cls) in MTP.items():
        add(hub, leaf, hook, cls)
    for tmpl, (leaf, hook, cls) in BLOCK.items():
      leaf = leaf.replace("{L}", root)
      if "{e}" in tmpl:
        for e in range(cfg.n_routed_experts):
          add(tmpl.format(P=p, e=e), leaf.replace("[{e}]", ""), hook, cls, (e,))
      else:
        add(tmpl.format(P=p), leaf, hook, cls)
  for hub, (leaf, hook, cls) in TOP_END.items():
    add(hub, leaf, hook, cls)
  covered = {e.leaf for e in out}
  uncovered = sorted(set(leaves) - covered)
  if uncovered:  # a model change the name map does not know about
    raise AssertionError(f"V4 name map covers no HF tensor for leaves {uncovered}")
  return out


def _hf_shape(e: Entry, leaves) -> tuple[int, ...]:
  return HOOKS[e.hook].hf_shape(leaves[e.leaf][0][len(e.index) :])


# ------------------------------------------------------------------------------------------------
# Quantised formats


def fp8_scale_shape(shape) -> tuple[int, int]:
  return fp8.scale_shape(shape)


def fp4_scale_shape(shape) -> tuple[int, int]:
  return (shape[0], shape[1] // FP4_BLOCK)


def dequantize_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
  """int8 [out, in/2] (two e2m1 codes a byte, the low nibble first) and scales [out, in/32]
  (e8m0 or fp32) -> fp32 [out, in]."""
  b = packed.view(np.uint8)
  codes = np.stack([b & 0xF, b >> 4], axis=-1).reshape(b.shape[0], -1)
  x = FP4_VALUES[codes & 7]
  x = np.where(codes & 8, -x, x)
  return x * np.repeat(scale.astype(np.float32), FP4_BLOCK, axis=1)


def _pow2_ceil(x: np.ndarray) -> np.ndarray:
  """Smallest power of two >= x (x > 0), exact from the exponent bits."""
  m, e = np.frexp(x.astype(np.float32))
  return np.ldexp(np.float32(1.0), np.where(m > 0.5, e, e - 1)).astype(np.float32)


def quantize_fp4(w: np.ndarray, scale: np.ndarray | None = None):
  """[out, in] -> (int8 [out, in/2] packed e2m1, fp32 scales [out, in/32]).

  scale: the source's scales (kept from the import); used where they still cover their block
  (|w|/s <= 6), so unchanged weights re-quantise bit-exactly. Other blocks get the smallest power
  of two with amax/s <= 6 (ue8m0).
  """
  o, i = w.shape
  wf = w.astype(np.float32).reshape(o, i // FP4_BLOCK, FP4_BLOCK)
  amax = np.abs(wf).max(axis=-1)
  fresh = np.where(amax > 0, _pow2_ceil(np.maximum(amax, 1e-30) / FP4_MAX), np.float32(1.0))
  s = fresh if scale is None else scale.astype(np.float32)
  if scale is not None:
    s = np.where((s > 0) & (amax <= s * FP4_MAX), s, fresh)
  q = np.clip(wf / s[..., None], -FP4_MAX, FP4_MAX).astype(ml_dtypes.float4_e2m1fn)
  codes = q.view(np.uint8).reshape(o, i) & 0xF
  packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
  return packed.view(np.int8), s.astype(np.float32)


def quantize_fp8(w: np.ndarray, scale: np.ndarray | None = None):
  """[out, in] -> (e4m3 codes, fp32 128x128 block scales).

  scale: the source's scales, used where they still cover their block (as `fp8.quantize`); other
  blocks get the smallest power of two with amax/s <= 448 (ue8m0), not fp8.py's amax/448.
  """
  amax = fp8._block_amax(w)
  fresh = np.where(amax > 0, _pow2_ceil(np.maximum(amax, 1e-30) / fp8.E4M3_MAX), np.float32(1.0))
  s = fresh.astype(np.float32)
  if scale is not None:
    old = scale.astype(np.float32)
    covered = (old > 0) & (amax <= old * np.float32(fp8.E4M3_MAX * (1 + 2**-7)))
    s = np.where(covered, old, s)
  return fp8.quantize(w, s)


def _scale_out(s: np.ndarray, dtype: str) -> np.ndarray:
  return np.ascontiguousarray(s.astype(safetensors_io.DTYPES[dtype]))


# ------------------------------------------------------------------------------------------------
# Validation


def _validate(entries: list[Entry], infos, leaves) -> dict[str, str]:
  """Checks names, shapes and dtypes of every HF tensor; returns {quantised name: its dtype}."""
  want = {e.hf: e for e in entries}
  scale_of = {e.scale: e for e in entries if e.hf.endswith(".weight")}
  scales = {n for n in infos if n in scale_of}
  weights = set(infos) - scales
  missing = [n for n in want if n not in infos]
  unexpected = [n for n in weights if n not in want]
  shapes, dtypes, quant = [], [], {}
  for n in sorted(weights & want.keys()):
    e, info = want[n], infos[n]
    shape = _hf_shape(e, leaves)
    dt = info.dtype
    if e.cls == "table":
      if dt not in _INT:
        dtypes.append(f"{n}: {dt} (expected one of {_INT})")
      elif info.shape != shape:
        shapes.append(f"{n}: {list(info.shape)} != expected {list(shape)}")
      continue
    if dt in _FLOAT:
      if info.shape != shape:
        shapes.append(f"{n}: {list(info.shape)} != expected {list(shape)}")
      continue
    if dt not in _QUANT:
      dtypes.append(f"{n}: {dt} (expected one of {_FLOAT + _QUANT})")
      continue
    if e.cls not in ("fp8", "expert"):
      dtypes.append(f"{n}: {dt} but only Linear weights and experts may be quantised")
      continue
    if dt == "I8" and e.cls != "expert":
      dtypes.append(f"{n}: I8 (packed FP4) but only routed experts may be FP4")
      continue
    if dt == "I8":
      want_shape, sshape = (shape[0], shape[1] // 2), fp4_scale_shape(shape)
      if shape[1] % FP4_BLOCK:
        dtypes.append(f"{n}: FP4 needs in % {FP4_BLOCK} == 0, got in = {shape[1]}")
        continue
    else:
      want_shape, sshape = shape, fp8_scale_shape(shape)
    if info.shape != want_shape:
      shapes.append(f"{n}: {list(info.shape)} != expected {list(want_shape)} ({dt})")
      continue
    s = infos.get(e.scale)
    if s is None:
      dtypes.append(f"{n}: {dt} without {e.scale}")
    elif s.dtype not in _SCALE_DTYPES or s.shape != sshape:
      dtypes.append(
        f"{e.scale}: {s.dtype}{list(s.shape)} != expected one of {_SCALE_DTYPES}{list(sshape)}"
      )
    else:
      quant[n] = dt
  for s in scales:
    w = scale_of[s].hf
    if w in infos and infos[w].dtype not in _QUANT:
      dtypes.append(f"{s}: a block scale for {w}, which is {infos[w].dtype}, not quantised")
  common.check_tensor_problems(missing, unexpected, shapes, dtypes)
  return quant


# ------------------------------------------------------------------------------------------------
# HF -> Orbax

_NOT_ARCH = {
  "param_dtype",
  "compute_dtype",
  "indexer_quant",
  "kv_quant",
  "impl",
  "attn_block_q",
  "init_std",
  "dtype",
  "scale_fmt",
  "expert_dtype",
  "max_batch_size",
}


def check_same_architecture(got: v4.V4Config, want: v4.V4Config, what: str) -> None:
  common.check_same_architecture(got, want, what, _NOT_ARCH)


def hf_to_orbax(
  hf_dir: str,
  orbax_dir: str,
  *,
  dtype: str = "float32",
  overrides: dict | None = None,
  expect: v4.V4Config | None = None,
  progress: bool = True,
) -> v4.V4Config:
  """Converts an HF DeepSeek-V4 checkpoint (hub or transformers layout, detected from the names;
  block scales as `X.scale` or `X.weight_scale_inv`) to an Orbax params checkpoint for
  `dsa_jax.checkpoint.load_params` into `v4.build(cfg)`.

  Args:
    hf_dir: config.json + model.safetensors.index.json + shards (or one model.safetensors).
    orbax_dir: output directory; must not exist.
    dtype: storage dtype of the weights ("float32" | "bfloat16"); FP8 / FP4 weights are
      dequantised (exactly, in either). fp32 tensors of the model (ape, sinks, hyper-connections,
      router bias) stay fp32.
    overrides: V4Config fields on top of the HF config.
    expect: if given, the HF config must describe this architecture.
  Returns:
    The V4Config of the checkpoint (param_dtype=dtype); also saved in hf_source/convert.json.
  Raises:
    ValueError listing missing / unexpected / mis-shaped / wrong-dtype / non-finite tensors,
    out-of-range hash tables, a config mismatch, a `quantization_config` other than FP8 e4m3 with
    128x128 blocks, block scales named both ways, or truncated / corrupt shards. Nothing is left at
    orbax_dir on failure.
  """
  dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype)
  common.check_out(orbax_dir)
  hf_cfg, cbytes, infos, readers, index_meta = common.open_hf_dir(hf_dir)
  layout = detect_layout(infos)
  suffix = detect_scale_suffix(infos, layout, f"HF checkpoint {hf_dir}")
  check_quantization_config(hf_cfg, f"HF config {hf_dir}/config.json:")
  has_mtp = any(n.startswith("mtp.") for n in infos) if layout == "transformers" else None
  cfg = config_from_hf(hf_cfg, has_mtp, **{"param_dtype": dtype, **(overrides or {})})
  if expect is not None:
    check_same_architecture(cfg, expect, f"HF config {hf_dir}/config.json")
  leaves = leaf_specs(cfg)
  entries = plan(cfg, layout, leaves, suffix)
  quant = _validate(entries, infos, leaves)
  with common.staged_dir(orbax_dir, "orbax-checkpoint-tmp") as tmp:
    writer = common.orbax_writer(tmp, leaves, entries)
    _import_tensors(cfg, entries, infos, readers, writer, leaves, quant, tmp, progress)
    writer.finalize()
    common.write_sidecar(
      tmp, hf_dir, cfg, cbytes, infos, readers, index_meta, arch=ARCH, layout=layout
    )
  return cfg


def _import_tensors(cfg, entries, infos, readers, writer, leaves, quant, out_dir, progress):
  by_name = {e.hf: e for e in entries}
  scale_specs = {by_name[n].scale: (infos[by_name[n].scale].dtype, infos[by_name[n].scale].shape)
                 for n in quant}  # fmt: skip
  # Kept so that a quantised export re-quantises with the same scales.
  scale_out, scales = common.scale_writer(out_dir, scale_specs), {}
  nonfinite, bad_table = [], []
  for e, x in common.stream_tensors(entries, infos, readers, progress):
    if e.hf in quant:
      s = common.read_tensor(infos, readers, e.scale)
      scales[e.scale] = s
      x = dequantize_fp4(x, s) if quant[e.hf] == "I8" else fp8.dequantize(x, s.astype(np.float32))
    elif e.cls != "table":
      x = x.astype(np.float32, copy=False)
    if e.cls == "table":
      if x.size and (x.min() < 0 or x.max() >= cfg.n_routed_experts):
        bad_table.append(e.hf)
    elif not np.isfinite(x).all():
      nonfinite.append(e.hf)
    y = HOOKS[e.hook].to_ours(x, cfg)
    writer.write(e.leaf, e.index, np.asarray(y, dtype=leaves[e.leaf][1]))
    del x, y
  common.write_all(scale_out, scales)
  common.check_values(
    nonfinite, (f"hash tables with expert ids outside [0, {cfg.n_routed_experts})", bad_table)
  )


# ------------------------------------------------------------------------------------------------
# Orbax -> HF


def _cfg_from_record(d: dict) -> v4.V4Config:
  return v4.V4Config(**{**d, "compress_ratios": tuple(d["compress_ratios"])})


def _specs(cfg, entries, leaves, src, src_scale, quantized, force) -> dict:
  """{HF name: (dtype, shape)} of an export, block scales included. src / src_scale: the source's
  {hub name: {"dtype": ...}} of each weight and of its scale ({} without a recorded source)."""

  def out_dtype(e: Entry) -> str:
    s = src.get(e.hub, {}).get("dtype")
    if e.cls == "table":
      return s or "I64"
    if quantized and e.cls in ("fp8", "expert"):
      if s in _QUANT:
        return s
      fp4_ok = _hf_shape(e, leaves)[1] % FP4_BLOCK == 0
      return "I8" if e.cls == "expert" and cfg.expert_dtype != "fp8" and fp4_ok else "F8_E4M3"
    if e.cls == "f32":
      return s if s in _FLOAT else "F32"
    return force or (s if s in _FLOAT else "BF16")

  specs: dict[str, tuple[str, tuple[int, ...]]] = {}
  for e in entries:
    shape, dt = _hf_shape(e, leaves), out_dtype(e)
    sdt = src_scale.get(e.hub, {}).get("dtype", "F8_E8M0")
    if dt == "I8":
      specs[e.hf] = (dt, (shape[0], shape[1] // 2))
      specs[e.scale] = (sdt, fp4_scale_shape(shape))
    elif dt == "F8_E4M3":
      specs[e.hf] = (dt, shape)
      specs[e.scale] = (sdt, fp8_scale_shape(shape))
    else:
      specs[e.hf] = (dt, shape)
  return specs


def hf_specs(
  cfg: v4.V4Config, layout: str = "hub", quantized: bool = False, dtype: str | None = None
) -> dict[str, tuple[str, tuple[int, ...]]]:
  """{HF name: (safetensors dtype, shape)} that `orbax_to_hf` writes for cfg without a recorded
  source (quantized=True: the release's formats)."""
  leaves = leaf_specs(cfg)
  return _specs(
    cfg, plan(cfg, layout, leaves), leaves, {}, {}, quantized, common.EXPORT_DTYPES.get(dtype)
  )


def orbax_to_hf(
  orbax_dir: str,
  hf_dir: str,
  *,
  cfg: v4.V4Config | None = None,
  dtype: str | None = None,
  quantized: bool = False,
  layout: str | None = None,
  max_shard_bytes: int = 5 * 10**9,
  progress: bool = True,
) -> None:
  """Writes a sharded HF DeepSeek-V4 directory (index, config.json, shards) from Orbax params.

  Args:
    orbax_dir: a params checkpoint (from `hf_to_orbax`, or `checkpoint.save_params` + cfg).
    hf_dir: output directory; must not exist.
    cfg: the V4Config; default: the one `hf_to_orbax` recorded in hf_source/.
    dtype: "bf16" | "fp32" for every non-quantised float tensor except the fp32 class (ape, sinks,
      hyper-connections, router bias: always fp32). Default: each tensor's source dtype, else bf16.
    quantized: the release's formats: FP8 e4m3 + e8m0 128x128 scales for the Linear weights that
      DeepSeek ships in FP8, FP4 e2m1 + e8m0 per-32 scales for routed experts (FP8 if the source
      had FP8 experts or cfg.expert_dtype == "fp8"). Source scales are reused where recorded, so an
      unchanged import comes back byte for byte; elsewhere scales are fresh powers of two.
      Without it, quantised source tensors are written dequantised (bf16 unless `dtype`).
    layout: "hub" | "transformers"; default: the source's, else "hub". Block scales are named as
      the source named them when the layout is the source's, else the layout's way (`X.scale` in
      the hub's, `X.weight_scale_inv` in transformers').
    max_shard_bytes: shard size when the source's shard layout cannot be reused.
  """
  common.check_out(hf_dir)
  reader = orbax_io.Reader(orbax_dir)
  record = common.read_sidecar(orbax_dir)
  if record is not None and record.get("arch") != ARCH:
    raise ValueError(f"{orbax_dir} was converted from a {record.get('arch', 'V3.2')} checkpoint")
  if cfg is None:
    if record is None:
      raise ValueError(f"{orbax_dir} has no hf_source/convert.json: pass cfg (the V4Config)")
    cfg = _cfg_from_record(record["model_config"])
  src_layout = (record or {}).get("layout")
  layout = layout or src_layout or "hub"
  force = common.export_dtype(dtype)
  leaves = leaf_specs(cfg)
  common.check_leaves(reader, leaves, orbax_dir)
  same_layout = layout == src_layout
  src_tensors = (record or {}).get("tensors", {})
  # How the source named its block scales; an export in its layout keeps that, else the layout's.
  src_suffix = detect_scale_suffix(src_tensors, src_layout, orbax_dir) if src_layout else None
  entries = plan(cfg, layout, leaves, src_suffix if same_layout else None)
  # The source's tensors by hub name (the layout may change on export).
  src_entries = {e.hf: e.hub for e in plan(cfg, src_layout, leaves)} if src_layout else {}
  src = {src_entries.get(n, n): v for n, v in src_tensors.items()}
  src_scale = {src_entries.get(n[: -len(src_suffix)] + ".weight"): v for n, v in src.items()
               if src_suffix and n.endswith(src_suffix)}  # fmt: skip

  specs = _specs(cfg, entries, leaves, src, src_scale, quantized, force)
  by_name = {e.hf: e for e in entries}
  scale_names = {e.scale: e for e in entries if e.scale in specs}
  has_quant = bool(scale_names)
  src_files = (record or {}).get("tensors", {}) if same_layout else {}
  files = common.assign_shards(specs, src_files, max_shard_bytes)
  hf_cfg = _export_config(record, cfg, has_quant, same_layout)
  scales_reader = (record or {}).get("scales")
  src_names = {h: n for n, h in src_entries.items()}
  file_meta = (record or {}).get("file_metadata", {}) if same_layout else {}
  meta = dict((record or {}).get("index_metadata") or {}) if same_layout else {}
  if "total_parameters" in meta and set(src_files) != set(specs):
    del meta["total_parameters"]  # transformers' count; no longer known

  src_scales = (scales_reader, src_names, src_suffix)

  def tensor(n):
    if n in scale_names:  # quantised again when its weight comes (deterministic)
      e = scale_names[n]
      _, s = _export_tensor(reader, e, specs[e.hf][0], src_scales, cfg)
      return _scale_out(s, specs[n][0])
    return _export_tensor(reader, by_name[n], specs[n][0], src_scales, cfg)[0]

  common.write_hf_dir(hf_dir, files, specs, tensor, file_meta, meta, hf_cfg, orbax_dir, progress)


def _export_tensor(reader, e: Entry, dt: str, src_scales, cfg):
  """Our slice -> (HF tensor in dtype dt, its fp32 block scale or None). src_scales: the import's
  scales (a Reader or None), {hub name: source name} and the source's scale suffix."""
  scales_reader, src_names, src_suffix = src_scales
  x = HOOKS[e.hook].to_hf(reader.read(e.leaf, e.index), cfg)
  if dt in _QUANT:
    sname = scale_name(src_names.get(e.hub, e.hf), src_suffix or SCALE_SUFFIX)
    old = None
    if scales_reader is not None and sname in scales_reader.infos:
      old = scales_reader.read(sname).astype(np.float32)
    if dt == "I8":
      if old is not None and old.shape != fp4_scale_shape(x.shape):
        old = None
      return quantize_fp4(x, old)
    if old is not None and old.shape != fp8_scale_shape(x.shape):
      old = None
    return quantize_fp8(x, old)
  return np.ascontiguousarray(x.astype(safetensors_io.DTYPES[dt])), None


def _export_config(record, cfg: v4.V4Config, has_quant: bool, same_layout: bool) -> bytes:
  if record is None or not same_layout:
    return common.config_bytes(hf_config_dict(cfg, has_quant))
  src = json.loads(record["config_bytes"])
  if ("quantization_config" in src) == has_quant:
    return record["config_bytes"]  # byte-identical round trip
  if has_quant:
    src["quantization_config"] = hf_config_dict(cfg, True)["quantization_config"]
  else:
    src.pop("quantization_config", None)
  return common.config_bytes(src)
