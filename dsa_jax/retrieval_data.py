# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Multi-query associative recall at controlled distances (issue 21), byte level.

A row is L bytes of filler text (the embedded corpus) with N key-value pairs and N queries written
over it, each key queried once, at a chosen distance after its pair (the canonical MQAR form,
one token per key and value):

  pair   k v        query   k v        (answer_mask marks the query's v: the target scored)

Keys are bytes 128..255, unique in the row; bytes >= 128 of the filler become "?", so the pair is
the only earlier occurrence of the query's key, and the answer is the byte after it (an
induction head: attend to the token after the earlier occurrence, copy it). Values are drawn
from the 62 letters and digits (chance 1/62). Per query:
- query_pos: the query's key byte, the position whose next-token prediction is v (the row S_t
  of the query);
- value_pos: the pair's v, the key that query has to reach;
- distance = query_pos - value_pos (a window of the last k keys holds it iff distance < k);
- pair_pos: the pair's key byte (value_pos - 1).

Distances: training rows draw them log-uniformly in [d_lo, d_hi]; eval rows give query i a
distance uniform in bucket i mod n_buckets, so every row covers every bucket (a draw that does
not fit the row, e.g. two pairs that both need its first bytes, is drawn again). Every row is a pure
function of its seed (numpy Generator), like data.py.
"""

from __future__ import annotations

import numpy as np

KEY_BASE, N_KEYS = 128, 128  # key bytes 128..255
SEG = 2  # bytes per pair and per query
MIN_DISTANCE = SEG - 1  # a query right after its pair
VALUES = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", np.uint8)


def max_distance(seq_len: int) -> int:
  """The longest distance a row of seq_len holds (pair at 0, query at the end)."""
  return seq_len - SEG - 1


def _layout(rng: np.random.Generator, seq_len: int, distances, tries: int = 10) -> np.ndarray:
  """Start of each pair p_i (its query starts at p_i + d_i + 1), no two segments overlapping.
  Longest distances are placed first (fewest choices); each pair start is uniform among the
  free ones; a layout that runs out of room is drawn again (dense rows)."""
  for _ in range(tries - 1):
    try:
      return _layout_once(rng, seq_len, distances)
    except ValueError:
      pass
  return _layout_once(rng, seq_len, distances)


def _layout_once(rng: np.random.Generator, seq_len: int, distances) -> np.ndarray:
  d = np.asarray(distances, np.int64)
  free = np.ones(seq_len, bool)
  starts = np.zeros(len(d), np.int64)
  for i in np.argsort(-d, kind="stable"):
    n = seq_len - SEG - int(d[i])  # pair starts 0 .. n-1 keep the query inside the row
    if n <= 0:
      raise ValueError(f"distance {d[i]} does not fit a row of {seq_len}")
    # a start p is free if [p, p+SEG) and [p+d+1, p+d+1+SEG) are free: windowed counts
    c = np.concatenate([[0], np.cumsum(free)])
    win = c[SEG:] - c[:-SEG] == SEG  # win[p]: [p, p+SEG) free, p in [0, L-SEG]
    ok = win[:n] & win[int(d[i]) + 1 : int(d[i]) + 1 + n]
    cand = np.flatnonzero(ok)
    if len(cand) == 0:
      raise ValueError(f"no room for a pair at distance {d[i]} in a row of {seq_len}")
    p = int(cand[rng.integers(len(cand))])
    q = p + int(d[i]) + 1
    free[p : p + SEG] = False
    free[q : q + SEG] = False
    starts[i] = p
  return starts


def row(rng: np.random.Generator, corpus: np.ndarray, seq_len: int, distances, text_weight=0.0):
  """One row with len(distances) pairs/queries -> (tokens [L] int32, loss_mask [L] f32, info).

  loss_mask is 1 on the answers and `text_weight` on the filler bytes (0 on the pairs and the
  query bytes before the answer). info: query_pos, value_pos, pair_pos, distance ([N] int32).
  """
  d = np.asarray(distances, np.int64)
  n = len(d)
  if n > N_KEYS:
    raise ValueError(f"{n} pairs: at most {N_KEYS} distinct keys")
  if d.min(initial=MIN_DISTANCE) < MIN_DISTANCE or d.max(initial=0) > max_distance(seq_len):
    raise ValueError(f"distances must be in [{MIN_DISTANCE}, {max_distance(seq_len)}]")
  start = int(rng.integers(0, len(corpus) - seq_len - 1))
  toks = corpus[start : start + seq_len].astype(np.int32)
  toks = np.where(toks >= KEY_BASE, ord("?"), toks)  # key bytes occur only where written below
  mask = np.full(seq_len, float(text_weight), np.float32)
  keys = KEY_BASE + rng.choice(N_KEYS, size=n, replace=False)
  vals = VALUES[rng.integers(0, len(VALUES), size=n)]
  p = _layout(rng, seq_len, d)
  q = p + d + 1
  toks[p], toks[p + 1], toks[q], toks[q + 1] = keys, vals, keys, vals
  mask[p], mask[p + 1], mask[q], mask[q + 1] = 0.0, 0.0, 0.0, 1.0
  info = dict(
    query_pos=q.astype(np.int32),
    value_pos=(p + 1).astype(np.int32),
    pair_pos=p.astype(np.int32),
    distance=(q - (p + 1)).astype(np.int32),
  )
  return toks, mask, info


def train_distances(rng: np.random.Generator, seq_len: int, n: int, d_lo: int, d_hi: int):
  """n distances log-uniform in [d_lo, d_hi] (d_hi <= 0: as far as the row allows)."""
  hi = max_distance(seq_len) if d_hi <= 0 else min(d_hi, max_distance(seq_len))
  lo = min(max(d_lo, MIN_DISTANCE), hi)
  return np.floor(np.exp(rng.uniform(np.log(lo), np.log(hi + 1), size=n))).astype(np.int64)


def _drawn_row(rng, corpus, seq_len: int, draw, text_weight: float = 0.0, tries: int = 20):
  """`row` with distances from draw(); a draw that does not fit (e.g. two pairs that both need
  the row's first bytes) is drawn again."""
  for i in range(tries):
    try:
      return row(rng, corpus, seq_len, draw(), text_weight)
    except ValueError:
      if i == tries - 1:
        raise
  raise AssertionError("unreachable")


def train_row(rng, corpus, seq_len: int, n_pairs: int, d_lo: int, d_hi: int, text_weight: float):
  """A training row: (tokens, loss_mask) with log-uniform distances (data.py's source 'retrieval')."""
  draw = lambda: train_distances(rng, seq_len, n_pairs, d_lo, d_hi)
  toks, mask, _ = _drawn_row(rng, corpus, seq_len, draw, text_weight)
  return toks, mask


def bucket_edges(seq_len: int, topk: int, lo_frac: float = 0.25) -> tuple[int, ...]:
  """Distance bucket edges k·lo_frac, 2x, 4x, ... up to the row's longest distance.

  E.g. L=8192, k=512: 128, 256, 512, 1024, 2048, 4096, 8190 (two buckets below k, four beyond).
  """
  edges, e = [], max(int(topk * lo_frac), MIN_DISTANCE)
  top = max_distance(seq_len) + 1
  while e < top:
    edges.append(e)
    e *= 2
  if top - edges[-1] < edges[-1] // 2 and len(edges) > 1:  # no sliver at the end
    edges[-1] = top
  else:
    edges.append(top)
  return tuple(edges)


def eval_batch(seq_len: int, edges, rows: int, n_pairs: int, *, seed: int = 2121, corpus=None):
  """Held-out rows: query i of a row has a distance uniform in [edges[b], edges[b+1]), b = i mod
  n_buckets. Returns dict tokens [R,L], answer_mask [R,L], and [R,N] int32 query_pos, value_pos,
  pair_pos, distance, bucket."""
  if corpus is None:
    from dsa_jax import data  # noqa: PLC0415

    corpus = data.stdlib_corpus("eval")
  edges = np.asarray(edges, np.int64)
  nb = len(edges) - 1
  if edges[0] < MIN_DISTANCE or edges[-1] > max_distance(seq_len) + 1:
    raise ValueError(f"bucket edges {edges.tolist()} outside [{MIN_DISTANCE}, {seq_len - SEG}]")
  out = {k: [] for k in ("tokens", "answer_mask", "query_pos", "value_pos", "pair_pos")}
  out |= {"distance": [], "bucket": []}
  for r in range(rows):
    rng = np.random.default_rng([seed, seq_len, r])
    b = np.arange(n_pairs) % nb
    toks, mask, info = _drawn_row(
      rng, corpus, seq_len, lambda: rng.integers(edges[b], edges[b + 1])
    )
    out["tokens"].append(toks)
    out["answer_mask"].append(mask)
    for k, v in info.items():
      out[k].append(v)
    out["bucket"].append(b.astype(np.int32))
  return {k: np.stack(v) for k, v in out.items()}


def packed_row(
  rng: np.random.Generator, seq_len: int, n_pairs: int, n_keys: int = N_KEYS, n_values: int = 0
):
  """A row of 2-byte segments only, no filler (the curriculum's first stage): n_pairs pairs
  `k v` (segment 0 is one, the others at random segments) and every other segment a query `k v`
  of a uniformly drawn earlier pair (keys unique among the pairs; a key may be queried more than
  once). -> (tokens [L] int32, loss_mask [L] f32: 1 on every query's value). Many answers a
  row, e.g. L=256, 32 pairs: 96 answers (train_row over text: one per pair). Keys are drawn
  from the first n_keys key bytes and values from the first n_values of VALUES (0: all 62): a
  small alphabet is an easier start."""
  n_seg = seq_len // SEG
  n_values = n_values or len(VALUES)
  if not 1 <= n_pairs <= min(n_keys, n_seg) or not 1 <= n_keys <= N_KEYS:
    raise ValueError(f"n_pairs={n_pairs} must be in [1, {min(n_keys, n_seg)}]")
  if not 1 <= n_values <= len(VALUES):
    raise ValueError(f"n_values={n_values} must be in [1, {len(VALUES)}]")
  is_pair = np.zeros(n_seg, bool)
  is_pair[0] = True
  is_pair[1 + rng.choice(n_seg - 1, size=n_pairs - 1, replace=False)] = True
  keys = KEY_BASE + rng.choice(n_keys, size=n_pairs, replace=False)
  vals = VALUES[rng.integers(0, n_values, size=n_pairs)]
  seen = np.cumsum(is_pair)  # pairs written up to and including each segment
  which = np.where(is_pair, seen - 1, (rng.random(n_seg) * seen).astype(np.int64))
  toks = np.full(seq_len, ord(" "), np.int32)
  mask = np.zeros(seq_len, np.float32)
  starts = SEG * np.arange(n_seg)
  toks[starts], toks[starts + 1] = keys[which], vals[which]
  mask[starts[~is_pair] + 1] = 1.0
  return toks, mask
