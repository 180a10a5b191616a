# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Embedded data that needs no download, and user text directories.

Every batch is a pure function of (seed, step, row): a run resumes at any step with identical data
(the data position is just the step), and each host builds only its rows of the global batch, so
the global batch is the same for any number of hosts. Plain numpy: works with or without grain.

Sources:
- `text`: the Python standard library's own source files, byte-level (vocab 256), as long
  documents; files are split into train/eval by a hash of their path.
- `passkey`: a 5-digit pass key hidden in text filler, asked for at the end, at a controlled
  distance (retrieval accuracy by distance).
- `mqar`: multi-query associative recall: key-value pairs, then queries for a subset of keys.
- `mixed`: text rows with a share of passkey and mqar rows.
- `retrieval`: `mqar_pairs` key-value pairs written over text filler, each queried once at a
  log-uniform distance (retrieval_data.py; issue 21).
- `retrieval_packed`: rows of pairs and queries only, no filler (retrieval_data.packed_row; the
  retrieval curriculum's first stage), keys/values from the first `retrieval_keys` /
  `retrieval_values` symbols.
- `dir`: a directory of .txt / .jsonl ("text" field) files, byte-level or with a `tokenizer.json`
  (the `tokenizers` package).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import sysconfig

import numpy as np

SOURCES = ("text", "passkey", "mqar", "mixed", "dir", "retrieval", "retrieval_packed")
DOC_SEP = 0  # byte 0 never occurs in source text: document separator


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  source: str = "mixed"
  seq_len: int = 1024
  batch_size: int = 8  # global batch
  seed: int = 0
  passkey_share: float = 0.25  # of rows in `mixed`
  mqar_share: float = 0.125
  mqar_pairs: int = 16
  path: str | None = None  # for source="dir"
  tokenizer: str | None = None  # tokenizer.json for source="dir"; None = bytes
  # source="retrieval": query-pair distances log-uniform in [min, max] (max 0: the whole row),
  # loss weight of the filler text (the answers weigh 1)
  retrieval_min_distance: int = 8
  retrieval_max_distance: int = 0
  retrieval_text_weight: float = 0.0
  # source="retrieval_packed": key / value alphabet sizes (0: all 128 keys / all 62 values)
  retrieval_keys: int = 0
  retrieval_values: int = 0

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"DataConfig.source={self.source!r}; expected one of {SOURCES}")
    if self.seq_len < 64:
      raise ValueError(f"DataConfig.seq_len={self.seq_len} must be >= 64 (room for the tasks)")
    if self.batch_size <= 0:
      raise ValueError(f"DataConfig.batch_size={self.batch_size} must be positive")
    for f in ("passkey_share", "mqar_share"):
      v = getattr(self, f)
      if not 0.0 <= v <= 1.0:
        raise ValueError(f"DataConfig.{f}={v} must be in [0, 1]")
    if self.retrieval_min_distance < 5 or self.retrieval_max_distance < 0:
      raise ValueError(
        "DataConfig.retrieval_min_distance must be >= 5, retrieval_max_distance >= 0"
      )
    if not (isinstance(self.retrieval_keys, int) and isinstance(self.retrieval_values, int)) or (
      self.retrieval_keys < 0 or self.retrieval_values < 0
    ):
      raise ValueError("DataConfig.retrieval_keys / retrieval_values must be integers >= 0")
    if self.passkey_share + self.mqar_share > 1.0:
      raise ValueError("DataConfig.passkey_share + mqar_share must be <= 1")
    if self.source == "dir" and not (self.path and os.path.isdir(self.path)):
      raise ValueError(
        f"DataConfig.path={self.path!r} must be an existing directory for source='dir'"
      )


# ----------------------------------------------------------------------------------------------
# corpora


@functools.lru_cache(maxsize=None)
def stdlib_corpus(split: str = "train") -> np.ndarray:
  """The stdlib's .py files (sorted, deterministic), byte-level, joined by DOC_SEP; uint8."""
  if split not in ("train", "eval"):
    raise ValueError(f"split={split!r}; expected 'train' or 'eval'")
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
  files = [f for f in files if "site-packages" not in f]
  parts = []
  for f in files:
    rel = os.path.relpath(f, root)
    is_eval = int(hashlib.md5(rel.encode()).hexdigest(), 16) % 20 == 0
    if is_eval != (split == "eval"):
      continue
    with open(f, "rb") as fh:
      b = fh.read().replace(b"\x00", b"")
    parts.append(np.frombuffer(b, np.uint8))
    parts.append(np.array([DOC_SEP], np.uint8))
  if not parts:
    raise ValueError(f"no stdlib sources found under {root}")
  return np.concatenate(parts)


@functools.lru_cache(maxsize=4)
def dir_corpus(path: str, tokenizer: str | None, split: str) -> np.ndarray:
  """Concatenated token ids of a directory of .txt/.jsonl files (every 20th file is eval)."""
  files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
  files += sorted(glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True))
  if not files:
    raise ValueError(f"no .txt or .jsonl files under {path}")
  tok = None
  if tokenizer:
    import tokenizers  # optional dependency, only for user tokenizers

    tok = tokenizers.Tokenizer.from_file(tokenizer)
  out = []
  for i, f in enumerate(files):
    if (i % 20 == 19) != (split == "eval"):
      continue
    if f.endswith(".jsonl"):
      with open(f) as fh:
        docs = []
        for n, line in enumerate(fh):
          if line.strip():
            try:
              docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError) as e:
              raise ValueError(f"{f}:{n + 1}: expected a JSON object with a 'text' field") from e
    else:
      with open(f, encoding="utf-8", errors="replace") as fh:
        docs = [fh.read()]
    for d in docs:
      ids = tok.encode(d).ids if tok else list(d.encode("utf-8"))
      out.append(np.asarray(ids + [DOC_SEP], np.int32))
  if not out:
    raise ValueError(f"split {split!r} of {path} is empty (need >= 20 files for an eval split)")
  return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# synthetic long-range tasks (byte-level)

_KEY_PREFIX = b"\n# pass key: "
_QUERY = b"\n# pass key? "


def passkey_row(rng: np.random.Generator, corpus: np.ndarray, seq_len: int, distance: int | None):
  """A pass key hidden `distance` tokens before the question; returns (tokens, answer_mask).

  The answer's 5 digits are the last tokens; answer_mask marks them (the targets to score).
  """
  key = bytes(rng.integers(ord("0"), ord("9") + 1, size=5).astype(np.uint8))
  needle = np.frombuffer(_KEY_PREFIX + key + b".\n", np.uint8)
  tail = np.frombuffer(_QUERY + key, np.uint8)
  room = seq_len - len(needle) - len(tail)
  if distance is None:
    distance = int(rng.integers(0, room + 1))
  distance = int(np.clip(distance, 0, room))
  start = int(rng.integers(0, len(corpus) - room - 1))
  filler = corpus[start : start + room]
  cut = room - distance
  toks = np.concatenate([filler[:cut], needle, filler[cut:], tail]).astype(np.int32)
  mask = np.zeros(seq_len, np.float32)
  mask[-5:] = 1.0
  return toks, mask


def mqar_row(rng: np.random.Generator, seq_len: int, n_pairs: int):
  """Key-value pairs `k=v;` then queries `k?v`; answer_mask marks the queried values."""
  letters = np.arange(ord("a"), ord("z") + 1)
  keys = rng.choice(len(letters) ** 2, size=n_pairs, replace=False)
  kb = [bytes([letters[k // 26], letters[k % 26]]) for k in keys]
  vb = [bytes(rng.choice(letters, 2).astype(np.uint8)) for _ in range(n_pairs)]
  ctx = b"".join(k + b"=" + v + b";" for k, v in zip(kb, vb)) + b"\n"
  toks, mask = list(ctx), [0.0] * len(ctx)
  while len(toks) + 6 <= seq_len:
    j = int(rng.integers(n_pairs))
    q = kb[j] + b"?" + vb[j] + b" "
    toks += list(q)
    mask += [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
  pad = seq_len - len(toks)
  toks += [ord(" ")] * pad
  mask += [0.0] * pad
  return np.asarray(toks[:seq_len], np.int32), np.asarray(mask[:seq_len], np.float32)


# ----------------------------------------------------------------------------------------------
# batches


def _corpus(cfg: DataConfig, split: str) -> np.ndarray:
  if cfg.source == "dir":
    return dir_corpus(cfg.path, cfg.tokenizer, split)
  return stdlib_corpus(split)


def _row(cfg: DataConfig, split: str, step: int, row: int):
  rng = np.random.default_rng([cfg.seed, 1 if split == "eval" else 0, step, row])
  corpus = _corpus(cfg, split)
  kind = cfg.source
  if kind == "mixed":
    u = rng.random()
    kind = (
      "passkey"
      if u < cfg.passkey_share
      else ("mqar" if u < cfg.passkey_share + cfg.mqar_share else "text")
    )
  if kind == "passkey":
    return passkey_row(rng, corpus, cfg.seq_len, None)
  if kind == "mqar":
    return mqar_row(rng, cfg.seq_len, cfg.mqar_pairs)
  if kind == "retrieval_packed":
    from dsa_jax import retrieval_data  # noqa: PLC0415

    n_keys = cfg.retrieval_keys or retrieval_data.N_KEYS
    return retrieval_data.packed_row(rng, cfg.seq_len, cfg.mqar_pairs, n_keys, cfg.retrieval_values)
  if kind == "retrieval":
    from dsa_jax import retrieval_data  # noqa: PLC0415

    return retrieval_data.train_row(
      rng,
      corpus,
      cfg.seq_len,
      cfg.mqar_pairs,
      cfg.retrieval_min_distance,
      cfg.retrieval_max_distance,
      cfg.retrieval_text_weight,
    )
  start = int(rng.integers(0, len(corpus) - cfg.seq_len - 1))
  toks = corpus[start : start + cfg.seq_len].astype(np.int32)
  return toks, np.ones(cfg.seq_len, np.float32)


def batch(cfg: DataConfig, step: int, split: str = "train", host: int = 0, n_hosts: int = 1):
  """This host's rows of global batch `step`: {tokens [b,L] int32, loss_mask [b,L] f32}.

  loss_mask[t] weights the prediction OF token t (from position t-1).
  """
  if cfg.batch_size % n_hosts:
    raise ValueError(f"batch_size={cfg.batch_size} is not divisible by {n_hosts} hosts")
  per = cfg.batch_size // n_hosts
  rows = [_row(cfg, split, step, host * per + r) for r in range(per)]
  return {
    "tokens": np.stack([r[0] for r in rows]),
    "loss_mask": np.stack([r[1] for r in rows]),
  }


def passkey_eval_batch(seq_len: int, distances, per_distance: int, seed: int = 1234):
  """Held-out pass-key rows at fixed distances: tokens [n,L], answer_mask [n,L], distance [n]."""
  corpus = stdlib_corpus("eval")
  toks, masks, dist = [], [], []
  for d in distances:
    for i in range(per_distance):
      rng = np.random.default_rng([seed, int(d), i])
      t, m = passkey_row(rng, corpus, seq_len, int(d))
      toks.append(t)
      masks.append(m)
      dist.append(int(d))
  return np.stack(toks), np.stack(masks), np.asarray(dist)


def mqar_eval_batch(seq_len: int, distances, per_distance: int, n_pairs: int = 8, seed: int = 4321):
  """Held-out multi-query recall at controlled distances: text filler, the `k=v;` pairs, `d`
  tokens of filler, then queries `k?v` of every pair (answer_mask marks the queried values).

  Returns tokens [n,L], answer_mask [n,L], distance [n] (gap between the pairs and the queries).
  """
  corpus = stdlib_corpus("eval")
  letters = np.arange(ord("a"), ord("z") + 1)
  toks, masks, dist = [], [], []
  for d in distances:
    for i in range(per_distance):
      rng = np.random.default_rng([seed, int(d), i])
      keys = rng.choice(len(letters) ** 2, size=n_pairs, replace=False)
      kb = [bytes([letters[k // 26], letters[k % 26]]) for k in keys]
      vb = [bytes(rng.choice(letters, 2).astype(np.uint8)) for _ in range(n_pairs)]
      ctx = np.frombuffer(
        b"\n" + b"".join(k + b"=" + v + b";" for k, v in zip(kb, vb)) + b"\n", np.uint8
      )
      order = rng.permutation(n_pairs)
      qs = np.frombuffer(b"".join(kb[j] + b"?" + vb[j] + b" " for j in order), np.uint8)
      qmask = np.tile(np.asarray([0, 0, 0, 1, 1, 0], np.float32), n_pairs)
      room = seq_len - len(ctx) - len(qs)
      if room < 0:
        raise ValueError(f"seq_len={seq_len} too short for {n_pairs} MQAR pairs")
      gap = int(np.clip(int(d), 0, room))
      start = int(rng.integers(0, len(corpus) - room - 1))
      filler = corpus[start : start + room]
      row = np.concatenate([filler[: room - gap], ctx, filler[room - gap :], qs]).astype(np.int32)
      mask = np.concatenate([np.zeros(seq_len - len(qs), np.float32), qmask])
      toks.append(row)
      masks.append(mask)
      dist.append(gap)
  return np.stack(toks), np.stack(masks), np.asarray(dist)
