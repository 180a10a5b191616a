# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Decode caches: the MLA latent cache and the lightning-indexer key cache.

See docs/dsa.md §Decoding and caches.

One `LayerCache` per layer, slot s = absolute position s of a request (right-padded batches: every
request starts at slot 0; `Cache.lengths[b]` is how many slots request b has written, i.e. the
position of its next token). Two storage modes:

- full precision: latent [c ; k_pe] in the compute dtype, indexer keys in the indexer's dtype.
- fp8 (DeepSeek's deployed layouts, docs/dsa.md §FP8 formats), struct-of-arrays with the same
  bytes per token:
  latent  = C e4m3 (c) + C/tile fp32 scales (one per 1 x tile block, tile = min(128, C))
            + R bf16 (k_pe, unquantised)       -> 512 + 4·4 + 64·2 = 656 B at V3.2 dims;
  indexer = Dᵢ e4m3 + 1 fp32 scale             -> 128 + 4 = 132 B.
  `packed_latent` / `packed_indexer` give the byte records themselves (FlashMLA / DeepGEMM order).

Scales follow the config's `scale_fmt` (ue8m0: powers of two, as shipped). The indexer keys are
Hadamard-rotated before quantisation (docs/dsa.md §Indexer); with `indexer_dtype="fp8"` the indexer
already did that and its keys are exact FP8 values, so the fp8 indexer cache is lossless.

Letters: L layers, B batch, S cache slots, T new tokens, C kv_lora_rank, R rope dim, Dᵢ indexer dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from dsa_jax import layers
from dsa_jax.config import ModelConfig

FP8 = jnp.float8_e4m3fn


def latent_tile(cfg: ModelConfig) -> int:
  """Quantisation tile of the latent: 128 (FlashMLA), or C itself when C < 128 (test sizes)."""
  tile = min(128, cfg.kv_lora_rank)
  if cfg.kv_lora_rank % tile:
    raise ValueError(f"kv_lora_rank={cfg.kv_lora_rank} must be a multiple of the FP8 tile {tile}")
  return tile


@struct.dataclass
class LayerCache:
  c: jax.Array  # [B,S,C] compute dtype, or e4m3
  c_scale: jax.Array | None  # [B,S,C/tile] f32 (fp8 only)
  pe: jax.Array  # [B,S,R] compute dtype, or bf16
  ik: jax.Array | None  # [B,S,Dᵢ] indexer keys (None without an indexer cache)
  ik_scale: jax.Array | None  # [B,S,1] f32 (fp8 only)


@struct.dataclass
class Cache:
  layers: tuple  # LayerCache per layer: dense layers first, then MoE layers (model order)
  lengths: jax.Array  # [B] int32 slots written per request = position of the next token
  fp8: bool = struct.field(pytree_node=False, default=False)

  @property
  def max_len(self) -> int:
    return self.layers[0].c.shape[1]


def _index_dtype(cfg: ModelConfig):
  # With indexer_dtype="fp8" the indexer returns fake-quantised keys in the compute dtype.
  return layers.dtype_of(cfg.compute_dtype if cfg.indexer_dtype == "fp8" else cfg.indexer_dtype)


def init(
  cfg: ModelConfig, batch: int, max_len: int, *, fp8: bool = False, indexer: bool = True
) -> Cache:
  """Zero caches for every layer (indexer=False: dense MLA only, no indexer keys)."""
  b, s, c, r, d = batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim
  cd = layers.dtype_of(cfg.compute_dtype)

  def one():
    if fp8:
      lat = dict(
        c=jnp.zeros((b, s, c), FP8),
        c_scale=jnp.ones((b, s, c // latent_tile(cfg)), jnp.float32),
        pe=jnp.zeros((b, s, r), jnp.bfloat16),
      )
      idx = dict(ik=jnp.zeros((b, s, d), FP8), ik_scale=jnp.ones((b, s, 1), jnp.float32))
    else:
      lat = dict(c=jnp.zeros((b, s, c), cd), c_scale=None, pe=jnp.zeros((b, s, r), cd))
      idx = dict(ik=jnp.zeros((b, s, d), _index_dtype(cfg)), ik_scale=None)
    if not indexer:
      idx = dict(ik=None, ik_scale=None)
    return LayerCache(**lat, **idx)

  return Cache(
    layers=tuple(one() for _ in range(cfg.n_layers)),
    lengths=jnp.zeros((b,), jnp.int32),
    fp8=fp8,
  )


def abstract(cfg: ModelConfig, batch: int, max_len: int, **kw) -> Cache:
  """The cache as ShapeDtypeStructs (nothing allocated; e.g. V3.2 at 128K)."""
  return jax.eval_shape(lambda: init(cfg, batch, max_len, **kw))


def bytes_per_token(cache: Cache) -> dict:
  """Bytes per token per layer of the latent and indexer caches, from the arrays' nbytes."""
  lc = cache.layers[0]
  b, s = lc.c.shape[:2]

  def nbytes(*xs):
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in xs if x is not None)

  return {
    "latent": nbytes(lc.c, lc.c_scale, lc.pe) // (b * s),
    "indexer": nbytes(lc.ik, lc.ik_scale) // (b * s),
    "total_all_layers": sum(nbytes(*jax.tree.leaves(x)) for x in cache.layers) // (b * s),
  }


# ----------------------------------------------------------------------------------------------
# quantisation


def quantize_latent(c, tile: int, scale_fmt):
  """c [...,C] -> (e4m3 [...,C], scales [...,C/tile] f32), one scale per 1 x tile block."""
  blocks = c.reshape(c.shape[:-1] + (c.shape[-1] // tile, tile))
  q, s = layers.fp8_quantize(blocks, scale_fmt)
  return q.reshape(c.shape), s[..., 0]


def dequantize_latent(q, scale, dtype):
  tile = q.shape[-1] // scale.shape[-1]
  blocks = q.reshape(q.shape[:-1] + (scale.shape[-1], tile)).astype(jnp.float32)
  return (blocks * scale[..., None]).reshape(q.shape).astype(dtype)


def rotate_index(cfg: ModelConfig, fp8: bool) -> bool:
  """Whether decode must Hadamard-rotate indexer q and k itself (fp8 cache, plain indexer)."""
  return fp8 and cfg.indexer_dtype != "fp8"


def write(cfg: ModelConfig, lc: LayerCache, pos, c, pe, ik) -> LayerCache:
  """Writes T new tokens of every request at slots pos [B,T] (c [B,T,C], pe [B,T,R], ik [B,T,Dᵢ]).

  Slots >= S are dropped; callers check lengths on the host.
  """
  b = pos.shape[0]
  at = (jnp.arange(b)[:, None], pos)
  put = lambda arr, v: arr.at[at].set(v.astype(arr.dtype), mode="drop")
  fp8 = lc.c_scale is not None
  if fp8:
    cq, cs = quantize_latent(c, latent_tile(cfg), cfg.scale_fmt)
    new = dict(c=put(lc.c, cq), c_scale=put(lc.c_scale, cs), pe=put(lc.pe, pe))
  else:
    new = dict(c=put(lc.c, c), pe=put(lc.pe, pe))
  if lc.ik is not None:
    if ik is None:
      raise ValueError("this cache holds indexer keys: pass them (attention='sparse')")
    if fp8:
      kq, ks = layers.fp8_quantize(ik, cfg.scale_fmt)
      new.update(ik=put(lc.ik, kq), ik_scale=put(lc.ik_scale, ks))
    else:
      new.update(ik=put(lc.ik, ik))
  return lc.replace(**new)


def read_latent(lc: LayerCache, dtype, end: int | None = None):
  """[B,S,C+R] latent rows [c ; k_pe] of slots [0, end) in `dtype` (dequantised from fp8)."""
  if lc.c_scale is not None:
    c = dequantize_latent(lc.c[:, :end], lc.c_scale[:, :end], dtype)
  else:
    c = lc.c[:, :end].astype(dtype)
  return jnp.concatenate([c, lc.pe[:, :end].astype(dtype)], axis=-1)


def read_indexer(lc: LayerCache, dtype, end: int | None = None):
  """[B,S,Dᵢ] indexer keys of slots [0, end) in `dtype` (dequantised from fp8)."""
  if lc.ik is None:
    raise ValueError("this cache has no indexer keys (built with indexer=False)")
  if lc.ik_scale is not None:
    return (lc.ik[:, :end].astype(jnp.float32) * lc.ik_scale[:, :end]).astype(dtype)
  return lc.ik[:, :end].astype(dtype)


# ----------------------------------------------------------------------------------------------
# byte records (interop / inspection; the arrays above are what decode uses)


def _bytes(x):
  """[..., n] of any dtype -> [..., n·itemsize] uint8 (native little-endian byte order)."""
  u8 = jax.lax.bitcast_convert_type(x, jnp.uint8)
  return u8.reshape(x.shape[:-1] + (-1,)) if u8.ndim > x.ndim else u8


def packed_latent(lc: LayerCache):
  """FlashMLA "FP8 with scale" records [B,S,C + 4·C/tile + 2R] uint8: e4m3 c, f32 scales, bf16 pe."""
  if lc.c_scale is None:
    raise ValueError("packed_latent needs an fp8 cache")
  return jnp.concatenate([_bytes(lc.c), _bytes(lc.c_scale), _bytes(lc.pe)], axis=-1)


def packed_indexer(lc: LayerCache):
  """Indexer key records [B,S,Dᵢ + 4] uint8: e4m3 key then its f32 scale (docs/dsa.md §FP8 formats;
  DeepGEMM's paged layout groups 64 tokens' values before their 64 scales, a permutation of these
  bytes)."""
  if lc.ik_scale is None:
    raise ValueError("packed_indexer needs an fp8 cache with indexer keys")
  return jnp.concatenate([_bytes(lc.ik), _bytes(lc.ik_scale)], axis=-1)
