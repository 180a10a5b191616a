# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Hugging Face DeepSeek-V3.2(-Exp) / V3.1 safetensors <-> dsa_jax Orbax params checkpoints.

Names and shapes: docs/dsa.md §Checkpoints. `NAME_MAP` maps each HF tensor name (with `{i}` = HF
layer, `{e}` = expert) to our leaf path (`{L}` = the block it lives in: `dense_layers[i]`,
`moe_layers[i - n_dense_layers]`, or `mtp.block` for the MTP layer i = n_layers) and a hook that
turns the HF tensor into our slice and back (`HOOKS`). Both directions stream one tensor at a time;
see `orbax_io` for how slices reach the stacked on-disk arrays and `common` for what the V4
converter shares.

Import keeps what export needs to reproduce the HF directory under `<orbax_dir>/hf_source/`: the
original config.json, every tensor's dtype / shape / shard, the FP8 block scales (so FP8 weights
re-quantise bit-exactly, see `fp8.py`) and the non-weight files (tokenizer, generation config).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import numpy as np
from flax import nnx

from dsa_jax import model as model_lib
from dsa_jax.config import ModelConfig, fp8_quantization_config, hf_config_dict
from dsa_jax.convert import common, fp8, orbax_io, safetensors_io

# ------------------------------------------------------------------------------------------------
# Name map. Value: (our leaf path, hook, which layers have it).
# Kinds: "top" (once), "all" (every decoder layer incl. MTP), "dense"/"moe" (by FFN type),
# "expert" (per routed expert), "mtp" (MTP layer only), "mtp_copy" (MTP copy of a shared tensor).

NAME_MAP: dict[str, tuple[str, str, str]] = {
  "model.embed_tokens.weight": ("embed", "copy", "top"),
  "model.norm.weight": ("norm.weight", "copy", "top"),
  "lm_head.weight": ("head.kernel", "linear", "top"),
  # Attention (MLA) and block norms.
  "model.layers.{i}.input_layernorm.weight": ("{L}.attn_norm.weight", "copy", "all"),
  "model.layers.{i}.post_attention_layernorm.weight": ("{L}.ffn_norm.weight", "copy", "all"),
  "model.layers.{i}.self_attn.q_a_proj.weight": ("{L}.attn.wq_a.kernel", "linear", "all"),
  "model.layers.{i}.self_attn.q_a_layernorm.weight": ("{L}.attn.q_norm.weight", "copy", "all"),
  "model.layers.{i}.self_attn.q_b_proj.weight": ("{L}.attn.wq_b.kernel", "linear", "all"),
  "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight": (
    "{L}.attn.wkv_a.kernel",
    "linear",
    "all",
  ),
  "model.layers.{i}.self_attn.kv_a_layernorm.weight": ("{L}.attn.kv_norm.weight", "copy", "all"),
  "model.layers.{i}.self_attn.kv_b_proj.weight": ("{L}.attn.wkv_b.kernel", "linear", "all"),
  "model.layers.{i}.self_attn.o_proj.weight": ("{L}.attn.wo.kernel", "linear", "all"),
  # Lightning indexer.
  "model.layers.{i}.self_attn.indexer.wq_b.weight": (
    "{L}.attn.indexer.wq_b.kernel",
    "linear",
    "all",
  ),
  "model.layers.{i}.self_attn.indexer.wk.weight": ("{L}.attn.indexer.wk.kernel", "linear", "all"),
  "model.layers.{i}.self_attn.indexer.k_norm.weight": (
    "{L}.attn.indexer.k_norm.weight",
    "copy",
    "all",
  ),
  "model.layers.{i}.self_attn.indexer.k_norm.bias": ("{L}.attn.indexer.k_norm.bias", "copy", "all"),
  "model.layers.{i}.self_attn.indexer.weights_proj.weight": (
    "{L}.attn.indexer.weights_proj.kernel",
    "linear",
    "all",
  ),
  # Dense SwiGLU FFN: gate_proj = w1, up_proj = w3, down_proj = w2.
  "model.layers.{i}.mlp.gate_proj.weight": ("{L}.ffn.w1.kernel", "linear", "dense"),
  "model.layers.{i}.mlp.up_proj.weight": ("{L}.ffn.w3.kernel", "linear", "dense"),
  "model.layers.{i}.mlp.down_proj.weight": ("{L}.ffn.w2.kernel", "linear", "dense"),
  # MoE: router, its balancing bias, routed experts [E, ...], shared experts.
  "model.layers.{i}.mlp.gate.weight": ("{L}.ffn.gate.kernel", "linear", "moe"),
  "model.layers.{i}.mlp.gate.e_score_correction_bias": ("{L}.ffn.gate_bias", "copy", "moe"),
  "model.layers.{i}.mlp.experts.{e}.gate_proj.weight": ("{L}.ffn.w1[{e}]", "linear", "expert"),
  "model.layers.{i}.mlp.experts.{e}.up_proj.weight": ("{L}.ffn.w3[{e}]", "linear", "expert"),
  "model.layers.{i}.mlp.experts.{e}.down_proj.weight": ("{L}.ffn.w2[{e}]", "linear", "expert"),
  "model.layers.{i}.mlp.shared_experts.gate_proj.weight": (
    "{L}.ffn.shared_experts.w1.kernel",
    "linear",
    "moe",
  ),
  "model.layers.{i}.mlp.shared_experts.up_proj.weight": (
    "{L}.ffn.shared_experts.w3.kernel",
    "linear",
    "moe",
  ),
  "model.layers.{i}.mlp.shared_experts.down_proj.weight": (
    "{L}.ffn.shared_experts.w2.kernel",
    "linear",
    "moe",
  ),
  # MTP layer (i = n_layers): eh_proj input is [enorm(emb) ; hnorm(h)] (vLLM's order; DeepSeek's
  # papers leave it open).
  "model.layers.{i}.enorm.weight": ("mtp.enorm.weight", "copy", "mtp"),
  "model.layers.{i}.hnorm.weight": ("mtp.hnorm.weight", "copy", "mtp"),
  "model.layers.{i}.eh_proj.weight": ("mtp.eh_proj.kernel", "linear", "mtp"),
  "model.layers.{i}.shared_head.norm.weight": ("mtp.norm.weight", "copy", "mtp"),
  # The MTP layer stores its own copies of the embedding and head; we share ours.
  "model.layers.{i}.embed_tokens.weight": ("embed", "copy", "mtp_copy"),
  "model.layers.{i}.shared_head.head.weight": ("head.kernel", "linear", "mtp_copy"),
}


HOOKS = {
  "copy": common.Hook(lambda x: x, lambda x: x, lambda s: tuple(s)),
  # torch Linear weights are [out, in]; our kernels are [in, out].
  "linear": common.Hook(lambda x: x.T, lambda x: x.T, lambda s: tuple(reversed(s))),
}

# Not FP8 in DeepSeek's checkpoints (docs/dsa.md §FP8 formats): embeddings, head, norms, router,
# indexer weights_proj, MTP eh_proj. Used by --fp8_export for tensors the import did not see.
_NOT_FP8 = re.compile(r"(embed_tokens|lm_head|norm|mlp\.gate\.|weights_proj|eh_proj|shared_head)")
SCALE_SUFFIX = "_scale_inv"
_FLOAT_DTYPES = ("F32", "BF16", "F16", "F8_E4M3")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor <-> one slice `leaf[index]` of our parameter tree."""

  hf: str
  leaf: str
  index: tuple[int, ...]
  hook: str
  kind: str

  @property
  def shared(self) -> bool:
    return self.kind == "mtp_copy"

  @property
  def indexer(self) -> bool:
    return ".indexer." in self.hf

  @property
  def fp8_default(self) -> bool:
    return self.hook == "linear" and not _NOT_FP8.search(self.hf)


def _block_root(cfg: ModelConfig, i: int) -> tuple[str, tuple[int, ...]]:
  if i < cfg.n_dense_layers:
    return "dense_layers", (i,)
  if i < cfg.n_layers:
    return "moe_layers", (i - cfg.n_dense_layers,)
  return "mtp.block", ()


def plan(cfg: ModelConfig) -> list[Entry]:
  """Every HF tensor of a checkpoint for `cfg`, in HF order (layers, then experts)."""
  out = []
  for hf, (leaf, hook, kind) in NAME_MAP.items():
    if kind == "top":
      out.append(Entry(hf, leaf, (), hook, kind))
  layers = list(range(cfg.n_layers)) + ([cfg.n_layers] if cfg.n_mtp_layers else [])
  for i in layers:
    root, idx = _block_root(cfg, i)
    is_moe = i >= cfg.n_dense_layers if i < cfg.n_layers else cfg.n_layers > cfg.n_dense_layers
    for hf, (leaf, hook, kind) in NAME_MAP.items():
      if kind == "top" or (kind in ("mtp", "mtp_copy") and i != cfg.n_layers):
        continue
      if (kind == "dense" and is_moe) or (kind in ("moe", "expert") and not is_moe):
        continue
      experts = range(cfg.n_routed_experts) if kind == "expert" else [None]
      for e in experts:
        name = hf.format(i=i, e=e)
        path = leaf.replace("{L}", root)
        index = idx
        if e is not None:
          path = path.replace("[{e}]", "")
          index = idx + (e,)
        out.append(Entry(name, path, index, hook, kind))
  return out


def leaf_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Our parameter leaves {dotted path: (shape, dtype)} for cfg (nothing allocated)."""
  return common.leaf_specs(model_lib.abstract(cfg))


# ------------------------------------------------------------------------------------------------
# Configs


_NOT_ARCH = {
  "param_dtype",
  "compute_dtype",
  "indexer_dtype",
  "impl",
  "attn_block_q",
  "remat",
  "init_std",
  "scale_fmt",
}


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """ModelConfig for an HF DeepSeek-V3.2(-Exp) or V3/V3.1 config dict (`ModelConfig.from_hf_config`:
  config.py holds the HF-config mapping, both directions). A config without
  `num_nextn_predict_layers` (transformers' DeepseekV32Config has none and never saves the MTP
  layer) describes a model without MTP."""
  return ModelConfig.from_hf_config(hf, **overrides)


def check_same_architecture(got: ModelConfig, want: ModelConfig, what: str) -> None:
  common.check_same_architecture(got, want, what, _NOT_ARCH)


# ------------------------------------------------------------------------------------------------
# Validation


def _validate(entries: list[Entry], infos, leaves, skip_missing) -> set[str]:
  """Checks names, shapes and dtypes of every HF tensor; returns the FP8 names."""
  want = {e.hf: e for e in entries}
  scales = {n for n in infos if n.endswith(SCALE_SUFFIX)}
  weights = set(infos) - scales
  missing = [n for n in want if n not in infos and not skip_missing(want[n])]
  unexpected = [n for n in weights if n not in want]
  shapes, dtypes, fp8_names = [], [], set()
  for n in weights & want.keys():
    e, info = want[n], infos[n]
    leaf_shape = leaves[e.leaf][0][len(e.index) :]
    hf_shape = HOOKS[e.hook].hf_shape(leaf_shape)
    if info.shape != hf_shape:
      shapes.append(f"{n}: {list(info.shape)} != expected {list(hf_shape)}")
    if info.dtype not in _FLOAT_DTYPES:
      dtypes.append(f"{n}: {info.dtype} (expected one of {_FLOAT_DTYPES})")
    elif info.dtype == "F8_E4M3":
      s = infos.get(n + SCALE_SUFFIX)
      if e.hook != "linear":
        dtypes.append(f"{n}: F8_E4M3 but only Linear weights may be FP8")
      elif s is None:
        dtypes.append(f"{n}: F8_E4M3 without {n + SCALE_SUFFIX}")
      elif s.dtype != "F32" or s.shape != fp8.scale_shape(info.shape):
        dtypes.append(
          f"{n + SCALE_SUFFIX}: {s.dtype}{list(s.shape)} != expected F32"
          f"{list(fp8.scale_shape(info.shape))}"
        )
      else:
        fp8_names.add(n)
  for s in scales:
    w = s[: -len(SCALE_SUFFIX)]
    if w not in infos:
      unexpected.append(s)
    elif infos[w].dtype != "F8_E4M3":
      dtypes.append(f"{s}: a block scale for {w}, which is {infos[w].dtype}, not F8_E4M3")
  common.check_tensor_problems(missing, unexpected, shapes, dtypes)
  return fp8_names


# ------------------------------------------------------------------------------------------------
# HF -> Orbax


def hf_to_orbax(
  hf_dir: str,
  orbax_dir: str,
  *,
  dtype: str = "float32",
  overrides: dict | None = None,
  expect: ModelConfig | None = None,
  seed: int = 0,
  init_missing_indexers: bool = False,
  progress: bool = True,
) -> ModelConfig:
  """Converts an HF DeepSeek-V3.2(-Exp) checkpoint (or V3/V3.1, indexers freshly initialised).

  Args:
    hf_dir: config.json + model.safetensors.index.json + shards (or one model.safetensors).
    orbax_dir: output params checkpoint for `dsa_jax.checkpoint.load_params`; must not exist.
    dtype: storage dtype of the parameters ("float32" | "bfloat16"); FP8 weights are dequantised.
    overrides: ModelConfig fields on top of the HF config (e.g. index_* sizes for a V3 import).
    expect: if given, the HF config must describe this architecture.
    seed: numpy seed of freshly initialised indexers.
    init_missing_indexers: initialise indexer tensors the checkpoint lacks (always on for a dense
      model_type deepseek_v3 source; for V3.2 only on request, e.g. should a release omit the MTP
      layer's indexer, which no published listing confirms).
  Returns:
    The ModelConfig of the checkpoint (param_dtype=dtype); also saved in hf_source/convert.json.
  Raises:
    ValueError listing missing / unexpected / mis-shaped / wrong-dtype / non-finite tensors, a
    config mismatch, or truncated / corrupt shards. Nothing is left at orbax_dir on failure.
  """
  dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype)
  common.check_out(orbax_dir)
  hf_cfg, cbytes, infos, readers, index_meta = common.open_hf_dir(hf_dir)
  cfg = config_from_hf(hf_cfg, **{"param_dtype": dtype, **(overrides or {})})
  if expect is not None:
    check_same_architecture(cfg, expect, f"HF config {hf_dir}/config.json")
  dense_source = hf_cfg.get("model_type") == "deepseek_v3" or init_missing_indexers
  entries = plan(cfg)
  leaves = leaf_specs(cfg)
  fp8_names = _validate(entries, infos, leaves, lambda e: dense_source and e.indexer)
  # Orbax treats *-tmp-* dirs as unfinished.
  with common.staged_dir(orbax_dir, "orbax-checkpoint-tmp") as tmp:
    writer = common.orbax_writer(tmp, leaves, entries)
    _import_tensors(entries, infos, readers, writer, leaves, fp8_names, tmp, progress)
    if dense_source:
      _init_indexers(cfg, entries, infos, writer, leaves, seed)
    writer.finalize()
    common.write_sidecar(tmp, hf_dir, cfg, cbytes, infos, readers, index_meta)
  return cfg


def _import_tensors(entries, infos, readers, writer, leaves, fp8_names, out_dir, progress):
  present = [e for e in entries if e.hf in infos]
  scale_specs = {n + SCALE_SUFFIX: ("F32", infos[n + SCALE_SUFFIX].shape) for n in fp8_names}
  # Kept so that --fp8_export re-quantises with the same scales (fp8.py).
  scale_out, scales = common.scale_writer(out_dir, scale_specs), {}
  shared_leaves = {(e.leaf, e.index) for e in present if e.shared}
  digests, nonfinite, copy_mismatch = {}, [], []
  for e, x in common.stream_tensors(present, infos, readers, progress):
    if e.hf in fp8_names:
      sname = e.hf + SCALE_SUFFIX
      s = common.read_tensor(infos, readers, sname)
      x = fp8.dequantize(x, s)
      scales[e.hf + SCALE_SUFFIX] = s
    else:
      x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
      nonfinite.append(e.hf)
    # The MTP layer's embed / head copies must equal the main ones (we store one shared copy).
    key = (e.leaf, e.index)
    if key in shared_leaves:
      dig = hashlib.sha256(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data).hexdigest()
      if key in digests:
        if digests[key] != dig:
          copy_mismatch.append(e.hf)
        del x
        continue
      digests[key] = dig
    writer.write(e.leaf, e.index, np.asarray(HOOKS[e.hook].to_ours(x), dtype=leaves[e.leaf][1]))
    del x
  common.write_all(scale_out, scales)
  common.check_values(
    nonfinite, ("MTP copies that differ from model.embed_tokens / lm_head", copy_mismatch)
  )


def _init_indexers(cfg, entries, infos, writer, leaves, seed):
  """Fresh indexer weights for a dense (V3/V3.1) source, drawn as `model.build` draws them."""
  _, state = nnx.split(model_lib.abstract(cfg))
  meta = {}
  for path, var in nnx.to_flat_state(state):
    meta[".".join(str(p) for p in path)] = var.get_metadata()
  rng = np.random.default_rng(seed)
  for e in entries:
    if not e.indexer or e.hf in infos:
      continue
    shape, dt = leaves[e.leaf]
    shape = shape[len(e.index) :]
    std = meta[e.leaf].get("init_std")
    if std is not None:
      x = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    elif e.leaf.endswith("weight"):
      x = np.ones(shape, np.float32)
    else:
      x = np.zeros(shape, np.float32)
    writer.write(e.leaf, e.index, x.astype(dt))


# ------------------------------------------------------------------------------------------------
# Orbax -> HF


def orbax_to_hf(
  orbax_dir: str,
  hf_dir: str,
  *,
  cfg: ModelConfig | None = None,
  dtype: str | None = None,
  fp8_export: bool = False,
  max_shard_bytes: int = 5 * 10**9,
  progress: bool = True,
) -> None:
  """Writes a sharded HF directory (index, config.json, shards) from an Orbax params checkpoint.

  Args:
    orbax_dir: a params checkpoint (from `hf_to_orbax`, or `checkpoint.save_params` + cfg).
    hf_dir: output directory; must not exist.
    cfg: the model config; default: the one `hf_to_orbax` recorded in hf_source/.
    dtype: "bf16" | "fp32" for every non-FP8 tensor (the router bias stays fp32). Default: each
      tensor's dtype in the imported checkpoint, else bf16.
    fp8_export: write Linear weights as float8_e4m3fn + 128x128 `weight_scale_inv`
      (docs/dsa.md §FP8 formats). With the scales kept by the import and unchanged weights this
      reproduces an FP8 source bit for bit.
    max_shard_bytes: shard size when the source's shard layout cannot be reused.
  """
  common.check_out(hf_dir)
  reader = orbax_io.Reader(orbax_dir)
  record = common.read_sidecar(orbax_dir)
  if cfg is None:
    if record is None:
      raise ValueError(f"{orbax_dir} has no hf_source/convert.json: pass cfg (the ModelConfig)")
    cfg = ModelConfig.from_dict(record["model_config"])
  leaves = leaf_specs(cfg)
  common.check_leaves(reader, leaves, orbax_dir)
  entries = plan(cfg)
  src = (record or {}).get("tensors", {})
  force = common.export_dtype(dtype)

  def out_dtype(e: Entry) -> str:
    if fp8_export and (src[e.hf]["dtype"] == "F8_E4M3" if e.hf in src else e.fp8_default):
      return "F8_E4M3"
    if e.hf.endswith("e_score_correction_bias"):
      return "F32"  # a tiny fp32 vector whose balancing updates would round away in bf16
    if force:
      return force
    if e.hf in src and src[e.hf]["dtype"] != "F8_E4M3":
      return src[e.hf]["dtype"]
    return "BF16"

  specs: dict[str, tuple[str, tuple[int, ...]]] = {}
  by_name: dict[str, Entry] = {}
  for e in entries:
    shape = HOOKS[e.hook].hf_shape(leaves[e.leaf][0][len(e.index) :])
    dt = out_dtype(e)
    specs[e.hf] = (dt, shape)
    by_name[e.hf] = e
    if dt == "F8_E4M3":
      specs[e.hf + SCALE_SUFFIX] = ("F32", fp8.scale_shape(shape))
  files = common.assign_shards(specs, src, max_shard_bytes)
  hf_cfg = _export_config(
    record,
    cfg,
    any(d == "F8_E4M3" for d, _ in specs.values()),
    "float32" if force == "F32" else "bfloat16",
  )
  scales_reader = (record or {}).get("scales")
  meta = dict((record or {}).get("index_metadata") or {})
  if "total_parameters" in meta:  # transformers' count; adjust for tensors added / dropped
    numel = lambda shape: int(np.prod(shape, dtype=np.int64))
    meta["total_parameters"] += sum(
      numel(sh) for n, (_, sh) in specs.items() if n not in src and not n.endswith(SCALE_SUFFIX)
    ) - sum(
      numel(v["shape"]) for n, v in src.items() if n not in specs and not n.endswith(SCALE_SUFFIX)
    )

  def tensor(n):
    if n.endswith(SCALE_SUFFIX):
      # Scales (F32) precede their F8 weights in a shard; the weight is quantised again when its
      # turn comes rather than held in memory (quantisation is deterministic).
      wname = n[: -len(SCALE_SUFFIX)]
      return _export_tensor(reader, by_name[wname], specs[wname][0], scales_reader)[1]
    return _export_tensor(reader, by_name[n], specs[n][0], scales_reader)[0]

  file_meta = (record or {}).get("file_metadata", {})
  common.write_hf_dir(hf_dir, files, specs, tensor, file_meta, meta, hf_cfg, orbax_dir, progress)


def _export_tensor(reader, e: Entry, dt: str, scales_reader):
  """Our slice -> (HF tensor in dtype dt, its block scale or None)."""
  x = HOOKS[e.hook].to_hf(reader.read(e.leaf, e.index))
  if dt == "F8_E4M3":
    sname = e.hf + SCALE_SUFFIX
    old = scales_reader.read(sname) if scales_reader and sname in scales_reader.infos else None
    if old is not None and old.shape != fp8.scale_shape(x.shape):
      old = None
    return fp8.quantize(x, old)
  return np.ascontiguousarray(x.astype(safetensors_io.DTYPES[dt])), None


def _export_config(record, cfg: ModelConfig, has_fp8: bool, torch_dtype: str) -> bytes:
  if record is None:
    return common.config_bytes(hf_config_dict(cfg, has_fp8, torch_dtype))
  src = json.loads(record["config_bytes"])
  same = ("quantization_config" in src) == has_fp8 and src.get("model_type") == "deepseek_v32"
  if same:
    return record["config_bytes"]  # byte-identical round trip
  if src.get("model_type") != "deepseek_v32":  # dense V3 import: now a DSA model
    src["model_type"] = "deepseek_v32"
    src["architectures"] = ["DeepseekV32ForCausalLM"]
    src.pop("auto_map", None)
    src.update(
      index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk
    )
  if has_fp8:
    src["quantization_config"] = fp8_quantization_config(cfg.scale_fmt)
  else:
    src.pop("quantization_config", None)
  return common.config_bytes(src)
