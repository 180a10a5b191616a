# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""DeepSeek-V4 decode caches (docs/v4.md §Decoding): window rings, compressor states, entries.

Per layer (m = compress_ratios[layer]):

- every layer: a ring of the last W = `window_size` raw rows, `window` [B,W,K]; position p lives
  in slot p mod W;
- CSA / HCA (m > 0): the compressor's state, the value and gate rows (gate without `ape`) of the
  last n tokens in a ring `comp` [B,n,c·K] f32 (slot p mod n; n = 2m for m = 4, whose entry j
  also pools block j−1; n = m otherwise), and the entries `entries` [B,U,K], U = S//m (entry j in
  slot j, written when block j completes);
- CSA: the indexer's compressor state `icomp` [B,8,2·Dᵢ] f32 and its keys `ikeys` [B,U,Dᵢ] f32.

The hyper-connection streams and the MoE are per token: nothing to cache. `lengths[b]` is the
number of positions request b has written, i.e. the position of its next token. Which ring slots
hold which position follows from `lengths` alone (`ring_positions`), so nothing else is stored.

fp8 (an option): window rows and entries keep their no-rope dims as e4m3 with one fp32
power-of-two scale per 64 values (the model's `kv_quant="fp8"` numerics, so storage is lossless
then) and the rope dims in the compute dtype.

Letters: L layers, B batch, S cache positions, W window, U entries, K row dim, R rope dim, Dᵢ
indexer dim, m ratio, n compressor-state rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from dsa_jax import layers
from dsa_jax.v4.config import V4Config

FP8 = jnp.float8_e4m3fn
FP8_BLOCK = 64  # values per scale of the no-rope dims (docs/v4.md §Numerics)


@struct.dataclass
class Rows:
  """Cached rows [B,N,K]: plain (`scale` None) or fp8 no-rope dims + per-64 scales + rope dims."""

  x: jax.Array  # [B,N,K] compute dtype, or [B,N,K−R] e4m3
  scale: jax.Array | None = None  # [B,N,(K−R)/64] f32
  rope: jax.Array | None = None  # [B,N,R] compute dtype (fp8 only)


@struct.dataclass
class CompressorState:
  kv: jax.Array  # [B,n,c·K] f32 value rows C_p of the last n positions, slot p mod n
  score: jax.Array  # [B,n,c·K] f32 gate rows Z_p (without ape)


@struct.dataclass
class V4LayerCache:
  window: Rows  # [B,W,K] the last W raw rows, slot p mod W
  comp: CompressorState | None = None  # m > 0
  entries: Rows | None = None  # [B,U,K] m > 0
  icomp: CompressorState | None = None  # CSA: the indexer's compressor
  ikeys: jax.Array | None = None  # [B,U,Dᵢ] f32, CSA


@struct.dataclass
class V4Cache:
  layers: tuple  # V4LayerCache per layer (model order)
  lengths: jax.Array  # [B] int32: positions written = the position of the next token
  max_len: int = struct.field(pytree_node=False, default=0)
  fp8: bool = struct.field(pytree_node=False, default=False)


def state_rows(ratio: int) -> int:
  """Compressor-state rows n: 2m for the overlapping m = 4 pooling, m otherwise."""
  return 2 * ratio if ratio == 4 else ratio


def ring_positions(end, n: int):
  """The position held by each of n ring slots once positions < end are written.

  end [B] -> [B,n] int32: slot i holds end−1 − ((end−1−i) mod n); negative = never written.
  """
  end = jnp.asarray(end, jnp.int32)[:, None]
  return end - 1 - jnp.mod(end - 1 - jnp.arange(n, dtype=jnp.int32)[None], n)


def _rows(cfg: V4Config, b: int, n: int, fp8: bool) -> Rows:
  cd = layers.dtype_of(cfg.compute_dtype)
  k, r = cfg.head_dim, cfg.rope_head_dim
  if not fp8:
    return Rows(jnp.zeros((b, n, k), cd))
  nb = -(-(k - r) // FP8_BLOCK)
  return Rows(
    jnp.zeros((b, n, k - r), FP8),
    jnp.ones((b, n, nb), jnp.float32),
    jnp.zeros((b, n, r), cd),
  )


def _state(b: int, n: int, width: int) -> CompressorState:
  z = jnp.zeros((b, n, width), jnp.float32)
  return CompressorState(z, z)


def init(cfg: V4Config, batch: int, max_len: int, *, fp8: bool = False) -> V4Cache:
  """Empty caches of every main-model layer for `batch` requests of up to `max_len` positions."""
  if fp8 and cfg.kv_quant != "fp8":
    raise ValueError(
      f"an fp8 V4 cache stores kv_quant='fp8' rows; this config has {cfg.kv_quant!r}"
    )
  b, k, di = batch, cfg.head_dim, cfg.index_head_dim
  out = []
  for i in range(cfg.n_layers):
    m = cfg.compress_ratios[i]
    lc = V4LayerCache(window=_rows(cfg, b, cfg.window_size, fp8))
    if m:
      c = 2 if m == 4 else 1
      lc = lc.replace(
        comp=_state(b, state_rows(m), c * k), entries=_rows(cfg, b, max_len // m, fp8)
      )
    if m == 4:
      lc = lc.replace(
        icomp=_state(b, 8, 2 * di), ikeys=jnp.zeros((b, max_len // 4, di), jnp.float32)
      )
    out.append(lc)
  return V4Cache(tuple(out), jnp.zeros((b,), jnp.int32), max_len=max_len, fp8=fp8)


def abstract(cfg: V4Config, batch: int, max_len: int, **kw) -> V4Cache:
  """The cache as ShapeDtypeStructs (nothing allocated; e.g. V4-Flash at 1M)."""
  return jax.eval_shape(lambda: init(cfg, batch, max_len, **kw))


def nbytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory(cache: V4Cache) -> dict:
  """Bytes of the cache: `per_token` (entries and indexer keys, all layers, per request and
  position) and `fixed` (window rings and compressor states, all layers, per request)."""
  b = cache.lengths.shape[0]
  grow = [(lc.entries, lc.ikeys) for lc in cache.layers]
  fixed = [(lc.window, lc.comp, lc.icomp) for lc in cache.layers]
  return {"per_token": nbytes(grow) / (b * cache.max_len), "fixed": nbytes(fixed) // b}


# ----------------------------------------------------------------------------------------------
# rows: writing and reading (fp8 quantises the no-rope dims per 64 with a power-of-two scale)


def encode(cfg: V4Config, like: Rows, x):
  """x [B,N,K] -> the Rows fields of `like`'s format."""
  if like.scale is None:
    return Rows(x.astype(like.x.dtype))
  r = cfg.rope_head_dim
  nope = x[..., :-r].astype(jnp.float32)
  pad = (-nope.shape[-1]) % FP8_BLOCK
  blocks = jnp.pad(nope, [(0, 0)] * (nope.ndim - 1) + [(0, pad)])
  blocks = blocks.reshape(nope.shape[:-1] + (-1, FP8_BLOCK))
  q, s = layers.fp8_quantize(blocks, cfg.scale_fmt)
  q = q.reshape(nope.shape[:-1] + (-1,))[..., : nope.shape[-1]]
  return Rows(q, s[..., 0], x[..., -r:].astype(like.rope.dtype))


def decode_rows(rows: Rows, dtype):
  """Rows -> [B,N,K] in `dtype` (dequantised from fp8)."""
  if rows.scale is None:
    return rows.x.astype(dtype)
  n = rows.x.shape[-1]
  pad = (-n) % FP8_BLOCK
  q = jnp.pad(rows.x.astype(jnp.float32), [(0, 0)] * (rows.x.ndim - 1) + [(0, pad)])
  q = q.reshape(q.shape[:-1] + (-1, FP8_BLOCK)) * rows.scale[..., None]
  nope = q.reshape(q.shape[:-2] + (-1,))[..., :n]
  return jnp.concatenate([nope.astype(dtype), rows.rope.astype(dtype)], axis=-1)


def scatter(rows: Rows, b_idx, slot, new: Rows) -> Rows:
  """rows[b_idx, slot] = new (slots out of range are dropped)."""
  put = lambda a, v: None if a is None else a.at[b_idx, slot].set(v.astype(a.dtype), mode="drop")
  return Rows(put(rows.x, new.x), put(rows.scale, new.scale), put(rows.rope, new.rope))


def select(keep, a: Rows, b: Rows) -> Rows:
  """where(keep [B,N], b, a) field by field."""
  w = lambda x, y: None if x is None else jnp.where(keep[..., None], y, x)
  return Rows(w(a.x, b.x), w(a.scale, b.scale), w(a.rope, b.rope))


def take(rows: Rows, idx) -> Rows:
  """rows gathered along N at idx [B,N'] (clipped)."""
  g = lambda a: None if a is None else jnp.take_along_axis(a, idx[..., None], axis=1, mode="clip")
  return Rows(g(rows.x), g(rows.scale), g(rows.rope))
