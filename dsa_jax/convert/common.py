# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""What the V3.2 (`deepseek_hf`) and V4 (`deepseek_v4_hf`) converters share: reading and
validating an HF directory, the `hf_source/` sidecar, streaming tensors with a progress bar, shard
assignment, and writing an output directory that appears only once complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time

import numpy as np
from flax import nnx
from tqdm import tqdm

from dsa_jax.convert import orbax_io, safetensors_io

EXPORT_DTYPES = {"bf16": "BF16", "bfloat16": "BF16", "fp32": "F32", "float32": "F32"}
SCALES_FILE = "fp8_scales.safetensors"  # the import's block scales, under hf_source/


@dataclasses.dataclass(frozen=True)
class Hook:
  """How an HF tensor becomes our slice and back (V4's functions also take the config)."""

  to_ours: callable  # HF tensor -> our slice
  to_hf: callable  # our slice -> HF tensor
  hf_shape: callable  # our slice shape -> HF shape


def list_problems(kind: str, names, limit: int = 30) -> str:
  names = sorted(names)
  more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
  return f"{kind} ({len(names)}): {names[:limit]}{more}"


def raise_problems(what: str, problems) -> None:
  """Raises ValueError(what + the non-empty (kind, names) of problems) if there are any."""
  found = [list_problems(kind, names) for kind, names in problems if names]
  if found:
    raise ValueError(what + "; ".join(found))


def check_tensor_problems(missing, unexpected, shapes, dtypes) -> None:
  """Raises if an HF checkpoint's tensors do not fit the plan (names, shapes, dtypes)."""
  raise_problems(
    "HF checkpoint does not match the model config: ",
    (
      ("missing", missing),
      ("unexpected", unexpected),
      ("wrong shapes", shapes),
      ("wrong dtypes", dtypes),
    ),
  )


def check_values(nonfinite, *problems) -> None:
  """Raises if imported tensors had non-finite values or other (kind, names) problems."""
  raise_problems(
    "HF checkpoint has bad tensors: ", (("non-finite values (corrupt data)", nonfinite), *problems)
  )


def check_same_architecture(got, want, what: str, ignore) -> None:
  """Raises if the config dataclasses differ in a field outside `ignore`."""
  diff = [
    f"{f.name}: {getattr(got, f.name)!r} != expected {getattr(want, f.name)!r}"
    for f in dataclasses.fields(want)
    if f.name not in ignore and getattr(got, f.name) != getattr(want, f.name)
  ]
  if diff:
    raise ValueError(f"{what} does not match the expected model config: {diff}")


def export_dtype(dtype: str | None) -> str | None:
  """The safetensors dtype forced by an export's `dtype` ("bf16" | "fp32" | None: none)."""
  if dtype is not None and dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected bf16 or fp32")
  return EXPORT_DTYPES.get(dtype)


def leaf_specs(abstract_model) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """The model's state leaves {dotted path: (shape, dtype)}."""
  state = nnx.to_pure_dict(nnx.state(abstract_model))
  out = {}

  def walk(t, p):
    if isinstance(t, dict):
      for k, v in t.items():
        walk(v, p + (str(k),))
    else:
      out[".".join(p)] = (tuple(t.shape), np.dtype(t.dtype))

  walk(state, ())
  return out


# ------------------------------------------------------------------------------------------------
# Output directories


def tmp_sibling(path: str, tag: str) -> str:
  parent, base = os.path.split(os.path.abspath(path))
  return os.path.join(parent, f".{base}.{tag}-{os.getpid()}-{time.time_ns()}")


def check_out(path: str) -> None:
  if os.path.exists(path):
    raise ValueError(f"output {path} already exists; remove it or choose another directory")


@contextlib.contextmanager
def staged_dir(path: str, tag: str):
  """Yields a temporary sibling of `path`, renamed to `path` if the block succeeds, else removed."""
  tmp = tmp_sibling(path, tag)
  try:
    yield tmp
    os.rename(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def orbax_writer(path: str, leaves, entries) -> orbax_io.Writer:
  """An `orbax_io.Writer` of `leaves`, chunked by the plan entries' slices."""
  depth = {e.leaf: len(e.index) for e in entries}
  return orbax_io.Writer(path, {k: (s, d, depth.get(k, 0)) for k, (s, d) in leaves.items()})


# ------------------------------------------------------------------------------------------------
# HF directories


def open_hf_dir(hf_dir: str):
  """Config dict and bytes, {name: TensorInfo}, {file: Reader}, index metadata; headers validated."""
  cpath = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(cpath):
    raise ValueError(f"HF checkpoint {hf_dir}: config.json not found")
  with open(cpath, "rb") as f:
    cbytes = f.read()
  try:
    hf_cfg = json.loads(cbytes)
  except json.JSONDecodeError as e:
    raise ValueError(f"HF checkpoint {hf_dir}: config.json is not valid JSON: {e}") from None
  ipath = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(ipath):
    try:
      with open(ipath) as f:
        index = json.load(f)
      weight_map, index_meta = index["weight_map"], index.get("metadata") or {}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"HF checkpoint {hf_dir}: bad model.safetensors.index.json: {e}") from None
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
    weight_map, files, index_meta = None, ["model.safetensors"], {}
  else:
    raise ValueError(
      f"HF checkpoint {hf_dir}: no model.safetensors.index.json or model.safetensors"
    )
  missing_files = [f for f in files if not os.path.isfile(os.path.join(hf_dir, f))]
  if missing_files:
    raise ValueError(
      f"HF checkpoint {hf_dir}: " + list_problems("missing shard files", missing_files)
    )
  readers, infos, errors, dup = {}, {}, [], []
  for fn in files:
    try:
      readers[fn] = safetensors_io.Reader(os.path.join(hf_dir, fn))
    except ValueError as e:
      errors.append(str(e))
      continue
    for name, info in readers[fn].infos.items():
      if name in infos:
        dup.append(name)
      infos[name] = info
  if errors:
    raise ValueError(f"HF checkpoint {hf_dir}: unreadable shards: {errors}")
  if dup:
    raise ValueError(f"HF checkpoint {hf_dir}: " + list_problems("tensors in two shards", dup))
  if weight_map is not None:
    wrong = [n for n, fn in weight_map.items() if n not in readers[fn].infos]
    if wrong:
      raise ValueError(
        f"HF checkpoint {hf_dir}: "
        + list_problems("tensors listed in the index but missing from their shard", wrong)
      )
  return hf_cfg, cbytes, infos, readers, index_meta


def read_tensor(infos, readers, name: str) -> np.ndarray:
  """HF tensor `name` from the shard that holds it."""
  return readers[os.path.basename(infos[name].path)].read(name)


def stream_tensors(entries, infos, readers, progress: bool):
  """Yields (entry, its HF tensor) in shard-file order, one tensor at a time, with a progress bar."""
  entries = sorted(entries, key=lambda e: (infos[e.hf].path, infos[e.hf].start))
  total = sum(infos[e.hf].nbytes for e in entries)
  bar = tqdm(total=total, unit="B", unit_scale=True, desc="hf->orbax", disable=not progress)
  for e in entries:
    yield e, read_tensor(infos, readers, e.hf)
    bar.update(infos[e.hf].nbytes)
  bar.close()


def scale_writer(out_dir: str, specs) -> safetensors_io.Writer | None:
  """A writer of hf_source/fp8_scales.safetensors for the import's block scales; None if none."""
  if not specs:
    return None
  os.makedirs(os.path.join(out_dir, "hf_source"), exist_ok=True)
  return safetensors_io.Writer(os.path.join(out_dir, "hf_source", SCALES_FILE), specs)


def write_all(writer: safetensors_io.Writer | None, tensors: dict) -> None:
  """Writes tensors {name: array} in the writer's order and closes it (nothing if no writer)."""
  if writer is None:
    return
  for n in writer.order:
    writer.write(n, tensors[n])
  writer.close()


# ------------------------------------------------------------------------------------------------
# The hf_source/ sidecar


def write_sidecar(out_dir, hf_dir, cfg, cbytes, infos, readers, index_meta, **extra):
  """hf_source/: the source config.json, convert.json (config, tensors, metadata, `extra` keys)
  and the source's non-weight files under extra/."""
  side = os.path.join(out_dir, "hf_source")
  os.makedirs(side, exist_ok=True)
  with open(os.path.join(side, "config.json"), "wb") as f:
    f.write(cbytes)
  record = {
    "model_config": cfg.to_dict(),
    "tensors": {
      n: {"dtype": i.dtype, "shape": list(i.shape), "file": os.path.basename(i.path)}
      for n, i in infos.items()
    },
    "file_metadata": {fn: r.metadata for fn, r in readers.items()},
    "index_metadata": index_meta,
    **extra,
  }
  with open(os.path.join(side, "convert.json"), "w") as f:
    json.dump(record, f)
  extra_dir = os.path.join(side, "extra")
  for fn in sorted(os.listdir(hf_dir)):
    p = os.path.join(hf_dir, fn)
    if (
      os.path.isfile(p)
      and fn not in ("config.json", "model.safetensors.index.json")
      and not fn.endswith((".safetensors", ".bin", ".pt", ".pth"))
    ):
      os.makedirs(extra_dir, exist_ok=True)
      shutil.copy2(p, os.path.join(extra_dir, fn))


def read_sidecar(orbax_dir):
  """convert.json of hf_source/ with "config_bytes" and "scales" (a Reader or None); None if absent."""
  side = os.path.join(orbax_dir, "hf_source")
  path = os.path.join(side, "convert.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    record = json.load(f)
  with open(os.path.join(side, "config.json"), "rb") as f:
    record["config_bytes"] = f.read()
  sp = os.path.join(side, SCALES_FILE)
  record["scales"] = safetensors_io.Reader(sp) if os.path.isfile(sp) else None
  return record


# ------------------------------------------------------------------------------------------------
# Orbax -> HF


def check_leaves(reader: orbax_io.Reader, leaves, path):
  """Raises unless the checkpoint has exactly `leaves`, with their shapes."""
  got = set(reader.names)
  missing = [n for n in leaves if n not in got]
  unexpected = [n for n in got if n not in leaves]
  shapes = []
  for n in leaves.keys() & got:
    s, _ = reader.shape_dtype(n)
    if s != leaves[n][0]:
      shapes.append(f"{n}: {list(s)} != expected {list(leaves[n][0])}")
  raise_problems(
    f"Orbax checkpoint {path} does not match the model config: ",
    (("missing", missing), ("unexpected", unexpected), ("wrong shapes", shapes)),
  )


def nbytes(dt: str, shape) -> int:
  return int(np.prod(shape, dtype=np.int64)) * safetensors_io.DTYPES[dt].itemsize


def assign_shards(specs, src, max_shard_bytes) -> dict[str, list[str]]:
  """Reuses the source's shard of every tensor when all are known, else packs in plan order."""
  if src and all(n in src for n in specs):
    files: dict[str, list[str]] = {}
    for n in specs:
      files.setdefault(src[n]["file"], []).append(n)
    return dict(sorted(files.items()))
  groups, cur, size = [], [], 0
  for n in specs:
    b = nbytes(*specs[n])
    if cur and size + b > max_shard_bytes:
      groups.append(cur)
      cur, size = [], 0
    cur.append(n)
    size += b
  groups.append(cur)
  k = len(groups)
  return {f"model-{j + 1:05d}-of-{k:05d}.safetensors": g for j, g in enumerate(groups)}


def write_index(path: str, weight_map: dict, metadata: dict) -> None:
  """model.safetensors.index.json in transformers' format."""
  index = {"metadata": metadata, "weight_map": weight_map}
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_hf_dir(
  hf_dir, files, specs, tensor, file_meta, index_meta, config_bytes, orbax_dir, progress
) -> None:
  """Writes `hf_dir` (it appears once complete): the shards `files` {file: names}, with
  tensor(name) -> array of specs[name], the index (index_meta + total_size), config.json and the
  files of orbax_dir/hf_source/extra."""
  with staged_dir(hf_dir, "tmp") as tmp:
    _write_hf_files(
      tmp, files, specs, tensor, file_meta, index_meta, config_bytes, orbax_dir, progress
    )


def _write_hf_files(
  out, files, specs, tensor, file_meta, index_meta, config_bytes, orbax_dir, progress
):
  os.makedirs(out)
  total = sum(nbytes(*specs[n]) for n in specs)
  bar = tqdm(total=total, unit="B", unit_scale=True, desc="orbax->hf", disable=not progress)
  for fn, names in files.items():
    w = safetensors_io.Writer(
      os.path.join(out, fn), {n: specs[n] for n in names}, file_meta.get(fn) or {"format": "pt"}
    )
    for n in w.order:
      w.write(n, tensor(n))
      bar.update(nbytes(*specs[n]))
    w.close()
  bar.close()
  weight_map = {n: fn for fn, names in files.items() for n in sorted(names)}
  write_index(out, weight_map, {**index_meta, "total_size": total})
  with open(os.path.join(out, "config.json"), "wb") as f:
    f.write(config_bytes)
  extra = os.path.join(orbax_dir, "hf_source", "extra")
  if os.path.isdir(extra):
    for fn in os.listdir(extra):
      shutil.copy2(os.path.join(extra, fn), os.path.join(out, fn))


def config_bytes(d: dict) -> bytes:
  """config.json bytes of a config dict (indent 2, trailing newline)."""
  return (json.dumps(d, indent=2) + "\n").encode()
