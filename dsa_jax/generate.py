# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""Generation: prefill, then token-by-token decode over the latent + indexer caches (cache.py).

Attention at decode is MLA's absorbed MQA mode (docs/dsa.md §MLA): the absorbed queries of
`MLA.project` against the cached latent rows [c ; k_pe], values c, then `MLA.out_from_latent`
(o = o_lat·W_UVᵀ, then wo). DSA decode scores the new token(s) against every cached indexer key,
keeps the top-k (k_eff = min(topk, pos + 1), -1 padded; docs/dsa.md §Decoding and caches: the new
key is written before scoring, so a token can select itself), and runs `sparse_attention.sparse_mla`
on the selected rows. Dense decode attends to every cached slot <= the query's position.

Batches are right-padded: request b's prompt fills slots 0..len_b-1 (its positions), pad tokens
after it are written but never visible (a query at position p sees slots <= p only), and decode
overwrites them. Prefill attends within the prompt with the same ops as the full forward, using the
values the cache returns (FP8 round trip included), so the first decode step sees exactly what
prefill saw.

The layer stacks are unrolled (a Python loop over the stacked parameters, sliced per layer) rather
than scanned: each layer's cache is then its own buffer, updated in place under donation, instead
of a scan output re-assembled (copied) every step. Decode graphs are small, so unrolling is cheap.

Letters: B batch, T new tokens, S cache slots, H heads, C kv_lora_rank, R rope dim, V vocab,
J/Dᵢ indexer heads/dim, k top-k slots.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsa_jax import cache as cache_lib
from dsa_jax import indexer as indexer_lib
from dsa_jax import layers, mla, sparse_attention
from dsa_jax.config import ModelConfig

ATTENTION = mla.DECODE_MODES  # "dense": every visible cache slot; "sparse": the indexer's top-k
DECODE_BLOCK_Q = 256  # query block of multi-token decode chunks (bounds the [t, H, S] logits)
DECODE_INDEX_BLOCK_Q = 16  # query block of the decode indexer scores (bounds [t, J, S] f32)
SHAPE_BUCKET = 64  # prompt and cache lengths are rounded up to this: fewer distinct compilations


def _map_blocks(fn, block: int, xs):
  """fn over blocks of `block` rows of axis 1 of every x in xs, concatenated (lax.map)."""
  t = xs[0].shape[1]
  if t <= block:
    return fn(*xs)
  n = -(-t // block)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, n * block - t)] + [(0, 0)] * (x.ndim - 2))
  split = lambda x: jnp.moveaxis(pad(x).reshape((x.shape[0], n, block) + x.shape[2:]), 1, 0)
  out = jax.lax.map(lambda a: fn(*a), [split(x) for x in xs])
  merge = lambda y: jnp.moveaxis(y, 0, 1).reshape((y.shape[1], n * block) + y.shape[3:])[:, :t]
  return jax.tree.map(merge, out)


def _visible(pos, s: int):
  """[B,t,S] True where cache slot s is visible to the query at position pos [B,t]."""
  return jnp.arange(s, dtype=jnp.int32)[None, None, :] <= pos[..., None]


def masked_mqa(q, kv, pos, *, scale: float, d_v: int):
  """Dense MQA attention over cache slots <= pos. q [B,T,H,K], kv [B,S,K], pos [B,T] ->
  [B,T,H,d_v] (values are kv[..., :d_v]). Every query sees slot 0, so rows are never empty."""

  def block(qb, pb):
    logits = jnp.einsum("bthk,bsk->bths", qb, kv, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(_visible(pb, kv.shape[1])[:, :, None], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
      "bths,bsv->bthv", p.astype(kv.dtype), kv[..., :d_v], preferred_element_type=jnp.float32
    )
    return out.astype(qb.dtype)

  return _map_blocks(block, DECODE_BLOCK_Q, [q, pos])


def cached_topk(iq, ik, iw, pos, *, topk: int):
  """Top-k cache slots per query: iq [B,T,J,Dᵢ], ik [B,S,Dᵢ], iw [B,T,J], pos [B,T] -> [B,T,k]
  int32, k = min(topk, S), descending score, -1 where fewer than k slots are visible.

  Scores I[t,s] = Σ_j w[t,j]·ReLU(q[t,j]·k[s]) (docs/dsa.md §Indexer) in one pass over the cache:
  with one query per request the [B,t,J,S] product is small, and the reference op's key-block loop
  would cost a kernel launch per 2048 keys per layer. Ties go to the lower slot (lax.top_k), as in
  the full forward's reference top-k.
  """

  def block(qb, wb, pb):
    z = jnp.einsum("btjd,bsd->btjs", qb, ik, preferred_element_type=jnp.float32)
    scores = jnp.einsum("btj,btjs->bts", wb.astype(jnp.float32), jax.nn.relu(z))
    scores = jnp.where(_visible(pb, ik.shape[1]), scores, -jnp.inf)
    vals, idx = jax.lax.top_k(scores, min(topk, ik.shape[1]))
    return jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)

  return jax.lax.stop_gradient(_map_blocks(block, DECODE_INDEX_BLOCK_Q, [iq, iw, pos]))


def _attention(attn, x, cos, sin, lc, pos, *, attention: str, fp8: bool, start: int | None):
  """One MLA layer over T new tokens at positions pos [B,T]; returns (out [B,T,D], new cache).

  start=None: decode, each query attends to the cache slots <= its own position.
  start=int: a prefill chunk at positions start..start+T-1 of every request, attending to slots
  [0, start+T) with the full forward's ops (queries are the last T of S = start+T keys).
  """
  cfg: ModelConfig = attn.cfg
  t = x.shape[1]
  scale, c_dim = cfg.softmax_scale, cfg.kv_lora_rank
  pr = attn.project(x, cos, sin, indexer=attention == "sparse")
  q_abs, iq, ik, iw = pr.q_abs, pr.iq, pr.ik, pr.iw
  if attention == "sparse" and cache_lib.rotate_index(cfg, fp8):
    # Rotate both sides: scores unchanged, FP8 error spread.
    iq, ik = layers.hadamard(iq), layers.hadamard(ik)
  lc = cache_lib.write(cfg, lc, pos, pr.c, pr.k_pe, ik)
  # Attend to what the cache returns (FP8 round trip included), so prefill and decode agree;
  # DeepSeek's updated reference likewise quant-dequantises c before use.
  end = None if start is None else start + t
  kv = cache_lib.read_latent(lc, q_abs.dtype, end=end)
  if attention == "dense":
    if start is None:
      o_lat = masked_mqa(q_abs, kv, pos, scale=scale, d_v=c_dim)
    else:
      o_lat, _ = sparse_attention.dense_attention(
        q_abs, kv, kv[..., :c_dim], scale=scale, block_t=cfg.attn_block_q
      )
  else:
    ikc = cache_lib.read_indexer(lc, iq.dtype, end=end)
    if start is None:
      idx = cached_topk(iq, ikc, iw, pos, topk=cfg.index_topk)
    else:
      idx = indexer_lib.select_topk(
        iq, ikc, iw, topk=cfg.index_topk, impl=cfg.impl, block_t=cfg.attn_block_q
      )
    o_lat, _ = sparse_attention.sparse_mla(q_abs, kv, idx, scale=scale, d_v=c_dim, impl=cfg.impl)
  return attn.out_from_latent(o_lat), lc


def blocks(model):
  """The model's blocks in layer order, each merged from its layer's slice of the stack."""
  for stack in (model.dense_layers, model.moe_layers):
    if stack is None:
      continue
    graphdef, state = nnx.split(stack)
    n = jax.tree.leaves(state)[0].shape[0]
    for i in range(n):
      yield nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def _layers(model, tokens, pos, cache: cache_lib.Cache, *, attention: str, start: int | None):
  """Embedding and every block over tokens [B,T] at positions pos [B,T] -> (h [B,T,D], layers)."""
  if attention not in ATTENTION:
    raise ValueError(f"attention={attention!r}; expected one of {ATTENTION}")
  if attention == "sparse" and cache.layers[0].ik is None:
    raise ValueError("attention='sparse' needs a cache with indexer keys (cache.init indexer=True)")
  cos, sin = layers.rope_angles(model.cfg, pos)
  h = model.embed_tokens(tokens)
  new = []
  for blk, lc in zip(blocks(model), cache.layers, strict=True):
    a, lc = _attention(
      blk.attn, blk.attn_norm(h), cos, sin, lc, pos, attention=attention, fp8=cache.fp8, start=start
    )
    h = h + a
    y = blk.ffn_norm(h)
    h = h + (blk.ffn(y)[0] if blk.use_moe else blk.ffn(y))
    new.append(lc)
  return h, tuple(new)


def _logits(model, h):
  return model.head(model.norm(h)).astype(jnp.float32)


def prefill(
  model,
  tokens,
  lengths,
  cache: cache_lib.Cache,
  *,
  attention: str,
  start: int = 0,
  all_logits: bool = False,
):
  """Runs a chunk of right-padded prompts tokens [B,T] at positions start..start+T-1.

  The first chunk has start=0 on an empty cache; a later chunk needs every request's cache filled
  to `start` (only the last chunk may end in padding). lengths [B]: each request's length after
  this chunk (<= start + T). Returns (logits, cache): logits [B,V] at each request's last real
  token ([B,T,V] at every chunk position with all_logits), cache with lengths = lengths.
  """
  b, t = tokens.shape
  if start + t > cache.max_len:
    raise ValueError(f"prefill chunk ends at {start + t} > cache max_len={cache.max_len}")
  pos = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  h, new = _layers(model, tokens, pos, cache, attention=attention, start=start)
  lengths = jnp.asarray(lengths, jnp.int32)
  if not all_logits:
    h = jnp.take_along_axis(h, (lengths - 1 - start)[:, None, None], axis=1)[:, 0]
  return _logits(model, h), cache.replace(layers=new, lengths=lengths)


def decode(model, tokens, cache: cache_lib.Cache, *, attention: str):
  """Appends tokens [B,T] at each request's next positions (cache.lengths + 0..T-1).

  T = 1 is a decode step (T > 1 scores a few tokens, e.g. speculative drafts). Returns
  (logits [B,T,V], cache with lengths + T). Positions past the cache's max_len are dropped: check
  on the host.
  """
  t = tokens.shape[1]
  pos = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  h, new = _layers(model, tokens, pos, cache, attention=attention, start=None)
  return _logits(model, h), cache.replace(layers=new, lengths=cache.lengths + t)


# ----------------------------------------------------------------------------------------------
# sampling and the generation loop


def sample(logits, key, *, temperature: float = 0.0, top_p: float = 1.0):
  """Next tokens [B] from logits [B,V]: greedy when temperature == 0, else softmax(logits / T)
  restricted to the smallest set of top tokens whose probability reaches top_p (nucleus)."""
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    n_keep = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1: the top token always stays
    cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateConfig:
  max_new_tokens: int = 32
  attention: str = "sparse"  # "dense" | "sparse" (DSA)
  fp8_cache: bool = False
  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0
  eos_id: int | None = None  # stop a request when it emits this token
  seed: int = 0

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ValueError(f"GenerateConfig.max_new_tokens={self.max_new_tokens} must be > 0")
    if self.attention not in ATTENTION:
      raise ValueError(f"GenerateConfig.attention={self.attention!r}; expected one of {ATTENTION}")
    if self.temperature < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"temperature={self.temperature} must be >= 0, top_p={self.top_p} in (0, 1]")


@functools.partial(
  jax.jit,
  static_argnums=(0,),
  static_argnames=("attention", "start", "all_logits"),
  donate_argnames=("cache",),
)
def prefill_step(graphdef, state, tokens, lengths, cache, *, attention, start=0, all_logits=False):
  """Jitted `prefill` on a split model (graphdef static, params state, cache donated)."""
  m = nnx.merge(graphdef, state)
  return prefill(m, tokens, lengths, cache, attention=attention, start=start, all_logits=all_logits)


@functools.partial(
  jax.jit, static_argnums=(0,), static_argnames=("attention",), donate_argnames=("cache",)
)
def decode_step(graphdef, state, tokens, cache, *, attention):
  """Jitted `decode` on a split model (graphdef static, params state, cache donated)."""
  return decode(nnx.merge(graphdef, state), tokens, cache, attention=attention)


@functools.partial(jax.jit, static_argnames=("temperature", "top_p"))
def _sample_jit(logits, key, *, temperature, top_p):
  return sample(logits, key, temperature=temperature, top_p=top_p)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, bucket: int = 1):
  """Right-pads token lists to a multiple of `bucket` -> (tokens [B,P] int32, lengths [B] int32)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  p = _round_up(max(len(x) for x in prompts), bucket)
  tokens = np.full((len(prompts), p), pad_id, np.int32)
  for i, x in enumerate(prompts):
    tokens[i, : len(x)] = x
  return tokens, np.array([len(x) for x in prompts], np.int32)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def generate(model, prompts: Sequence[Sequence[int]], gen: GenerateConfig) -> list[list[int]]:
  """Generates up to gen.max_new_tokens for each prompt (a batch of different lengths).

  Returns the new tokens of each request (cut after eos_id when set). DeepSeek-V4 models run
  `dsa_jax.v4.decode.generate` (window rings, compressor states, compressed caches).
  """
  if not isinstance(model.cfg, ModelConfig):
    from dsa_jax.v4 import decode as v4_decode  # V4Config; imports this module

    return v4_decode.generate(model, prompts, gen)
  cfg: ModelConfig = model.cfg
  tokens, lengths = pad_prompts(prompts, bucket=SHAPE_BUCKET)
  max_len = cache_len(cfg, tokens, lengths, gen)
  cache = cache_lib.init(
    cfg, len(prompts), max_len, fp8=gen.fp8_cache, indexer=gen.attention == "sparse"
  )
  graphdef, state = nnx.split(model)
  logits, cache = prefill_step(graphdef, state, tokens, lengths, cache, attention=gen.attention)
  step = functools.partial(decode_step, graphdef, state, attention=gen.attention)
  return sample_loop(logits, cache, step, gen)


def cache_len(cfg, tokens, lengths, gen: GenerateConfig) -> int:
  """Cache length for padded prompts plus gen.max_new_tokens (a multiple of SHAPE_BUCKET); raises
  past cfg.max_seq_len."""
  longest = int(lengths.max())
  if longest + gen.max_new_tokens > cfg.max_seq_len:
    raise ValueError(
      f"longest prompt {longest} + max_new_tokens {gen.max_new_tokens} exceeds "
      f"max_seq_len={cfg.max_seq_len}"
    )
  return _round_up(max(tokens.shape[1], longest + gen.max_new_tokens), SHAPE_BUCKET)


def sample_loop(logits, cache, step, gen: GenerateConfig) -> list[list[int]]:
  """Samples up to gen.max_new_tokens from the prefill's logits [B,V], feeding each token [B,1] to
  step(tokens, cache) -> (logits [B,1,V], cache); stops once every row has sampled eos. Returns
  each row's tokens, cut after eos."""
  key = jax.random.key(gen.seed)
  out, done = [], np.zeros(logits.shape[0], bool)
  for i in range(gen.max_new_tokens):
    tok = _sample_jit(
      logits, jax.random.fold_in(key, i), temperature=gen.temperature, top_p=gen.top_p
    )
    tok_np = np.asarray(tok)
    out.append(tok_np)
    if gen.eos_id is not None:
      done |= tok_np == gen.eos_id
    if done.all() or i == gen.max_new_tokens - 1:
      break
    logits, cache = step(tok[:, None], cache)
    logits = logits[:, -1]
  seqs = np.stack(out, axis=1).tolist()
  if gen.eos_id is not None:
    seqs = [s[: s.index(gen.eos_id) + 1] if gen.eos_id in s else s for s in seqs]
  return seqs
