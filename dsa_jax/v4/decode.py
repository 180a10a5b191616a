# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""DeepSeek-V4 generation: prefill from the forward, then decode over fixed-size caches.

docs/v4.md §Decoding. `prefill` runs right-padded prompts (positions 0..P−1) through the same ops
as the full forward and fills each layer's cache (cache.py): the last W raw rows, the compressor
rows of the current partial block (and, for m = 4, of the block before it), the complete
entries and the indexer keys. `decode` appends T tokens per request (T = 1 for a decode step) at
positions lengths..lengths+T−1:

    rows   = [window ring (W) | the T new raw rows]       visible to t: t − W < s ≤ t, s ≥ 0
    blocks = the blocks that complete inside the step     pooled from [state ring | new rows]
    entries[j] written for each completed block j          before attending: j < (t+1)//m
    CSA: the indexer's keys likewise, top-k over entries j < (t+1)//4 (or every one, dense)
    o      = one softmax over the window rows, the entries and the sink

so an entry becomes visible exactly when its block completes, never a partial block. The caches
are fixed-size (entries [B, S//m, K]), so a jitted step compiles once.

Letters: B batch, T new tokens, S cache positions, W window, U entries (S//m), H heads, K row
dim, n compressor-state rows, k top-k, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dsa_jax import generate as generate_lib
from dsa_jax.v4 import cache as cache_lib
from dsa_jax.v4 import rope
from dsa_jax.v4.attention import check_mode
from dsa_jax.v4.compressor import pool

SHAPE_BUCKET = generate_lib.SHAPE_BUCKET


# ----------------------------------------------------------------------------------------------
# compressor state: pooling the blocks that complete inside a step


def _ring_index(p, start, n: int):
  """Where position p [B,...] lives in [state ring (n) | new rows]: new rows start at `start` [B]."""
  s = start.reshape(start.shape + (1,) * (p.ndim - 1))
  return jnp.where(p >= s, n + p - s, jnp.mod(p, n))


def _compress_step(comp, state: cache_lib.CompressorState, x, start, n_tok: int):
  """Rows of the new tokens and the entries of the blocks they complete.

  comp: the Compressor; x [B,T,D] at positions start..start+T−1 (start [B]).
  Returns (entries [B,N,K'] (N = T//m + 1 candidate blocks), block ids [B,N] (−1: none),
  new state).
  """
  m = comp.ratio
  n = cache_lib.state_rows(m)
  kv, score = comp.rows(x)  # [B,T,c·K]
  hist_kv = jnp.concatenate([state.kv, kv], axis=1)  # [B,n+T,c·K]
  hist_s = jnp.concatenate([state.score, score], axis=1)
  nb = n_tok // m + 1
  j = start[:, None] // m + jnp.arange(nb, dtype=jnp.int32)[None]  # [B,N] candidate blocks
  done = j < ((start + n_tok) // m)[:, None]
  r = jnp.arange(m, dtype=jnp.int32)
  ape = comp.ape[...]

  def gather(first):  # rows of the blocks starting at first [B,N] -> kv, score [B,N,m,c·K]
    p = first[..., None] + r  # [B,N,m]
    i = _ring_index(p, start, n).reshape(p.shape[0], -1, 1)
    g = lambda a: jnp.take_along_axis(a, i, axis=1, mode="clip").reshape(p.shape + a.shape[-1:])
    s = g(hist_s) + ape  # slot r of a block is position ≡ r (mod m)
    live = (p >= 0)[..., None]
    return jnp.where(live, g(hist_kv), 0.0), jnp.where(live, s, -jnp.inf)

  bkv, bs = gather(j * m)
  if m == 4:  # entry j: first halves of block j−1, second halves of block j (compressor.pool)
    k = bkv.shape[-1] // 2
    pkv, ps = gather((j - 1) * m)
    bkv = jnp.concatenate([pkv[..., :k], bkv[..., k:]], axis=2)
    bs = jnp.concatenate([ps[..., :k], bs[..., k:]], axis=2)
  pooled = jnp.sum(jax.nn.softmax(bs, axis=2) * bkv, axis=2)  # [B,N,K']
  ent = comp.entries(pooled, j * m, x.dtype)
  # The ring keeps the last n positions: slot i holds position q_i of the updated ring.
  q = cache_lib.ring_positions(start + n_tok, n)
  i = _ring_index(q, start, n)[..., None]
  new = cache_lib.CompressorState(
    jnp.take_along_axis(hist_kv, i, axis=1, mode="clip"),
    jnp.take_along_axis(hist_s, i, axis=1, mode="clip"),
  )
  return ent, jnp.where(done, j, -1), new


def _write_entries(arr, ids, new):
  """arr [B,U,...] with new [B,N,...] at entry ids [B,N] (−1: skipped)."""
  u = arr.shape[1]
  b = jnp.arange(arr.shape[0])[:, None]
  return arr.at[b, jnp.where(ids >= 0, ids, u)].set(new.astype(arr.dtype), mode="drop")


def _write_rows(cfg, rows: cache_lib.Rows, ids, new):
  b = jnp.arange(ids.shape[0])[:, None]
  slot = jnp.where(ids >= 0, ids, rows.x.shape[1])
  return cache_lib.scatter(rows, b, slot, cache_lib.encode(cfg, rows, new))


# ----------------------------------------------------------------------------------------------
# one attention layer


def _joint_softmax(q, parts, sink, scale: float):
  """o [B,T,H,K] of one softmax over every part and the sink (logits of masked keys −inf).

  parts: [(rows [B,N,K] shared by the queries or [B,T,N,K] per query, mask [B,T,N])].
  """
  logits, eqs = [], []
  for rows, ok in parts:
    eq = "bthk,bnk->bthn" if rows.ndim == 3 else "bthk,btnk->bthn"
    lg = jnp.einsum(eq, q, rows, preferred_element_type=jnp.float32) * scale
    logits.append(jnp.where(ok[:, :, None], lg, -jnp.inf))
    eqs.append("bthn,bnk->bthk" if rows.ndim == 3 else "bthn,btnk->bthk")
  sink = jnp.broadcast_to(sink.astype(jnp.float32)[None, None, :, None], q.shape[:3] + (1,))
  lse = jax.nn.logsumexp(jnp.concatenate(logits + [sink], axis=-1), axis=-1, keepdims=True)
  out = 0.0
  for lg, (rows, _), eq in zip(logits, parts, eqs, strict=True):
    out = out + jnp.einsum(eq, jnp.exp(lg - lse), rows.astype(jnp.float32))
  return out.astype(q.dtype)


def _indexer_topk(iq, iw, ik, pos, topk: int):
  """Top-k cached entries per query: iq [B,T,J,Dᵢ], iw [B,T,J], ik [B,U,Dᵢ], pos [B,T] ->
  [B,T,k] int32 (−1 padded), ties to the lower id, entries j >= (t+1)//4 never chosen."""
  z = jnp.einsum("btjd,bud->btju", iq, ik, preferred_element_type=jnp.float32)
  scores = jnp.einsum("btju,btj->btu", jax.nn.relu(z), iw.astype(jnp.float32))
  ok = jnp.arange(ik.shape[1])[None, None] < ((pos + 1) // 4)[..., None]
  vals, idx = jax.lax.top_k(jnp.where(ok, scores, -jnp.inf), min(topk, ik.shape[1]))
  idx = jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)
  return jnp.pad(idx, ((0, 0), (0, 0), (0, topk - idx.shape[-1])), constant_values=-1)


def _decode_attention(attn, x, lc: cache_lib.V4LayerCache, start, *, attention: str):
  """One V4 attention layer over T new tokens per request at positions start + 0..T−1.

  x [B,T,D] normed; returns (y [B,T,D], updated layer cache)."""
  cfg, m = attn.cfg, attn.ratio
  b, t = x.shape[:2]
  w = cfg.window_size
  pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [B,T]
  cos, sin = rope.angles(cfg, pos, compressed=m > 0)
  qr, q, kv = attn.project(x, cos, sin)
  # Window: [ring | new rows], visible iff t − W < s ≤ t.
  ring = cache_lib.decode_rows(lc.window, kv.dtype)
  rows = jnp.concatenate([ring, kv], axis=1)
  rpos = jnp.concatenate([cache_lib.ring_positions(start, w), pos], axis=1)  # [B,W+T]
  d = pos[:, :, None] - rpos[:, None, :]
  parts = [(rows, (rpos[:, None, :] >= 0) & (d >= 0) & (d < w))]
  new_win = cache_lib.ring_positions(start + t, w)
  take = cache_lib.take(
    cache_lib.encode(cfg, lc.window, kv), jnp.maximum(new_win - start[:, None], 0)
  )
  lc = lc.replace(window=cache_lib.select(new_win >= start[:, None], lc.window, take))
  if m:
    ent, ids, comp = _compress_step(attn.compressor, lc.comp, x, start, t)
    entries = _write_rows(cfg, lc.entries, ids, ent)
    lc = lc.replace(comp=comp, entries=entries)
    n_vis = ((pos + 1) // m)[..., None]  # [B,T,1]
    if m == 4 and attention == "sparse":
      iq, iw = attn.indexer.query(x, qr, cos, sin)
      ient, iids, icomp = _compress_step(attn.indexer.compressor, lc.icomp, x, start, t)
      ikeys = _write_entries(lc.ikeys, iids, ient)
      lc = lc.replace(icomp=icomp, ikeys=ikeys)
      sel = _indexer_topk(iq, iw, ikeys, pos, cfg.index_topk)  # [B,T,k]
      got = cache_lib.take(entries, jnp.maximum(sel, 0).reshape(b, -1))  # only the chosen rows
      got = cache_lib.decode_rows(got, kv.dtype).reshape(sel.shape + (-1,))  # [B,T,k,K]
      parts.append((got, (sel >= 0) & (sel < n_vis)))
    else:
      if m == 4:  # dense mode: keep the indexer's state current all the same
        ient, iids, icomp = _compress_step(attn.indexer.compressor, lc.icomp, x, start, t)
        lc = lc.replace(icomp=icomp, ikeys=_write_entries(lc.ikeys, iids, ient))
      ckv = cache_lib.decode_rows(entries, kv.dtype)  # [B,U,K]
      parts.append((ckv, jnp.arange(ckv.shape[1])[None, None] < n_vis))
  o = _joint_softmax(q, parts, attn.attn_sink[...], cfg.softmax_scale)
  return attn.output(o, cos, sin), lc


def _prefill_attention(attn, x, lc: cache_lib.V4LayerCache, lengths, *, attention: str):
  """One layer over prompts at positions 0..P−1 with the full forward's ops; fills the cache
  from each request's first lengths[b] positions. Returns (y [B,P,D], layer cache)."""
  cfg, m = attn.cfg, attn.ratio
  p = x.shape[1]
  cos, sin = attn.rope_angles(p)
  qr, q, kv = attn.project(x, cos, sin)

  def last(arr, n):  # the rows of the last n positions < lengths, as a ring [B,n,...]
    ps = cache_lib.ring_positions(lengths, n)
    g = jnp.take_along_axis(arr, jnp.maximum(ps, 0)[..., None], axis=1, mode="clip")
    return jnp.where((ps >= 0)[..., None], g, 0)

  def compress(comp):  # entries [B,P//m,K'] (the forward's) and the state ring
    ckv, score = comp.rows(x)
    pooled = pool(ckv, score, comp.ape[...], comp.ratio)
    ent = comp.entries(pooled, jnp.arange(pooled.shape[1]) * comp.ratio, x.dtype)
    n = cache_lib.state_rows(comp.ratio)
    return ent, cache_lib.CompressorState(last(ckv, n), last(score, n))

  lc = lc.replace(window=cache_lib.encode(cfg, lc.window, last(kv, cfg.window_size)))
  ckv = idx = None
  if m:
    ckv, comp = compress(attn.compressor)
    lc = lc.replace(comp=comp)
    if ckv.shape[1]:
      u = jnp.arange(ckv.shape[1])[None].repeat(x.shape[0], 0)
      lc = lc.replace(entries=_write_rows(cfg, lc.entries, u, ckv))
      ckv = cache_lib.decode_rows(cache_lib.encode(cfg, lc.entries, ckv), ckv.dtype)
  if m == 4:
    ik, icomp = compress(attn.indexer.compressor)
    lc = lc.replace(icomp=icomp)
    if ik.shape[1]:
      lc = lc.replace(ikeys=lc.ikeys.at[:, : ik.shape[1]].set(ik))
    if attention == "sparse":
      iq, iw = attn.indexer.query(x, qr, cos, sin)
      idx = attn.select(iq, ik, iw)
  o, _ = attn.attend(q, kv, ckv, idx)
  return attn.output(o, cos, sin), lc


# ----------------------------------------------------------------------------------------------
# the model


def _run(model, tokens, cache: cache_lib.V4Cache, layer_fn):
  """Embedding, every block (layer_fn for the attention), head -> (logits [B,T,V] f32, layers)."""
  e = model.embed_tokens(tokens)
  h = jnp.broadcast_to(e[:, :, None], e.shape[:2] + (model.cfg.hc_mult,) + e.shape[2:])
  new = []
  for blk, lc in zip(model.layers, cache.layers, strict=True):
    h, lc = blk.hc_attn(h, lambda x, blk=blk, lc=lc: layer_fn(blk.attn, blk.attn_norm(x), lc))
    h, _ = blk.hc_ffn(h, lambda x, blk=blk: blk.ffn(blk.ffn_norm(x), tokens))
    new.append(lc)
  return h, tuple(new)


def _logits(model, h):
  return model.head(model.norm(model.hc_head(h))).astype(jnp.float32)


def prefill(model, tokens, lengths, cache: cache_lib.V4Cache, *, attention: str, all_logits=False):
  """Right-padded prompts tokens [B,P] (positions 0..P−1; request b is its first lengths[b]) on
  an empty cache. Returns (logits [B,V] at each request's last prompt token, or [B,P,V] with
  all_logits; the cache with lengths)."""
  check_mode(attention)
  b, p = tokens.shape
  if p > cache.max_len:
    raise ValueError(f"prompt length {p} > cache max_len={cache.max_len}")
  lengths = jnp.asarray(lengths, jnp.int32)
  fn = lambda attn, x, lc: _prefill_attention(attn, x, lc, lengths, attention=attention)
  h, new = _run(model, tokens, cache, fn)
  if not all_logits:
    h = jnp.take_along_axis(h, (lengths - 1)[:, None, None, None], axis=1)
  logits = _logits(model, h)
  return (logits if all_logits else logits[:, 0]), cache.replace(layers=new, lengths=lengths)


def decode(model, tokens, cache: cache_lib.V4Cache, *, attention: str):
  """Appends tokens [B,T] at each request's next positions (lengths + 0..T−1); T = 1 is a step.

  Returns (logits [B,T,V], cache with lengths + T). Positions past max_len: check on the host.
  """
  check_mode(attention)
  start = cache.lengths
  fn = lambda attn, x, lc: _decode_attention(attn, x, lc, start, attention=attention)
  h, new = _run(model, tokens, cache, fn)
  return _logits(model, h), cache.replace(layers=new, lengths=start + tokens.shape[1])


@functools.partial(
  jax.jit,
  static_argnums=(0,),
  static_argnames=("attention", "all_logits"),
  donate_argnames=("cache",),
)
def prefill_step(graphdef, state, tokens, lengths, cache, *, attention, all_logits=False):
  """Jitted `prefill` on a split model (graphdef static, cache donated)."""
  m = nnx.merge(graphdef, state)
  return prefill(m, tokens, lengths, cache, attention=attention, all_logits=all_logits)


@functools.partial(
  jax.jit, static_argnums=(0,), static_argnames=("attention",), donate_argnames=("cache",)
)
def decode_step(graphdef, state, tokens, cache, *, attention):
  """Jitted `decode` on a split model (graphdef static, cache donated)."""
  return decode(nnx.merge(graphdef, state), tokens, cache, attention=attention)


def generate(model, prompts: Sequence[Sequence[int]], gen) -> list[list[int]]:
  """Generates up to gen.max_new_tokens per prompt (`dsa_jax.generate.GenerateConfig`: greedy or
  temperature / top-p sampling, eos) with a V4 model; returns each request's new tokens."""
  cfg = model.cfg
  tokens, lengths = generate_lib.pad_prompts(prompts, bucket=SHAPE_BUCKET)
  max_len = generate_lib.cache_len(cfg, tokens, lengths, gen)
  cache = cache_lib.init(cfg, len(prompts), max_len, fp8=gen.fp8_cache)
  graphdef, state = nnx.split(model)
  logits, cache = prefill_step(graphdef, state, tokens, lengths, cache, attention=gen.attention)
  step = functools.partial(decode_step, graphdef, state, attention=gen.attention)
  return generate_lib.sample_loop(logits, cache, step, gen)
