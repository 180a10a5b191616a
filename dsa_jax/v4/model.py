# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The DeepSeek-V4 transformer (docs/v4.md §Model): hyper-connected blocks, MTP, build / abstract.

    h_0 = [emb(x)] * M                                        [B,T,M,D]  M residual streams
    h   = HC_attn(h, F = V4Attention_m(attn_norm(·)))         m = compress_ratios[layer]
    h   = HC_ffn(h, F = V4MoE(ffn_norm(·), tokens))           hash routing in the first layers
    logits = head(norm(HyperHead(h)))                         fp32

Every block has its own layer type (window / CSA / HCA, hash or learned routing), so blocks are
a list run by a Python loop, not a scanned stack (scanning runs of equal layers: later work).

MTP (one module, DeepSeek's layout): from the final streams h and the embedding of token t+1,
`x = e_proj(enorm(emb)) + h_proj(hnorm(h))` per stream, one block (ratio compress_ratios[-1]),
its own HyperHead and norm, the shared output head; position t predicts token t+2.

Letters: B batch, T tokens, M streams, D model dim, V vocabulary, E experts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsa_jax import layers, sparse_attention
from dsa_jax.v4 import attention as attention_lib
from dsa_jax.v4 import hyper
from dsa_jax.v4 import moe as moe_lib
from dsa_jax.v4.config import V4Config


class V4Block(nnx.Module):
  def __init__(self, cfg: V4Config, layer: int, *, rngs: nnx.Rngs):
    self.layer = layer
    self.attn_norm = layers.RMSNorm(cfg.dim, cfg.norm_eps)
    self.attn = attention_lib.V4Attention(cfg, cfg.compress_ratios[layer], rngs=rngs)
    self.ffn_norm = layers.RMSNorm(cfg.dim, cfg.norm_eps)
    self.ffn = moe_lib.V4MoE(cfg, layer < cfg.n_hash_layers, rngs=rngs)
    self.hc_attn = hyper.HyperConnection(cfg, rngs=rngs)
    self.hc_ffn = hyper.HyperConnection(cfg, rngs=rngs)

  def __call__(
    self, h, tokens, *, attention: str = "dense", indexer_loss: str = "none", metrics=False
  ):
    """h [B,T,M,D], tokens [B,T] -> (h [B,T,M,D], aux: moe_load [E] and the attention's aux)."""
    h, aux = self.hc_attn(
      h,
      lambda x: self.attn(
        self.attn_norm(x), attention=attention, indexer_loss=indexer_loss, metrics=metrics
      ),
    )
    h, load = self.hc_ffn(h, lambda x: self.ffn(self.ffn_norm(x), tokens))
    return h, {**aux, "moe_load": load}


class V4MTP(nnx.Module):
  def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs):
    self.e_proj = layers.Linear(cfg.dim, cfg.dim, ("embed2", "embed"), cfg, rngs=rngs)
    self.h_proj = layers.Linear(cfg.dim, cfg.dim, ("embed2", "embed"), cfg, rngs=rngs)
    self.enorm = layers.RMSNorm(cfg.dim, cfg.norm_eps)
    self.hnorm = layers.RMSNorm(cfg.dim, cfg.norm_eps)
    self.norm = layers.RMSNorm(cfg.dim, cfg.norm_eps)
    self.block = V4Block(cfg, cfg.n_layers, rngs=rngs)
    self.hc_head = hyper.HyperHead(cfg, rngs=rngs)

  def __call__(
    self, h, emb_next, tokens_next, *, attention: str = "dense", indexer_loss: str = "none"
  ):
    """h [B,T,M,D] final streams, emb_next [B,T,D] -> (x [B,T,D] normed for the head, aux)."""
    x = self.e_proj(self.enorm(emb_next))[:, :, None] + self.h_proj(self.hnorm(h))
    x, aux = self.block(x, tokens_next, attention=attention, indexer_loss=indexer_loss)
    return self.norm(self.hc_head(x)), aux


class V4Transformer(nnx.Module):
  def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = layers.dtype_of(cfg.param_dtype)
    self.embed = layers.param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), 1.0, pd)
    self.layers = nnx.List([V4Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.hc_head = hyper.HyperHead(cfg, rngs=rngs)
    self.norm = layers.RMSNorm(cfg.dim, cfg.norm_eps)
    self.head = layers.Linear(cfg.dim, cfg.vocab_size, ("embed", "vocab"), cfg, rngs=rngs)
    self.mtp = V4MTP(cfg, rngs=rngs) if cfg.n_mtp_layers else None

  def embed_tokens(self, tokens):
    return self.embed[...][tokens].astype(layers.dtype_of(self.cfg.compute_dtype))

  def __call__(
    self,
    tokens,
    *,
    attention: str = "dense",
    indexer_loss: str = "none",
    mtp: bool = False,
    metrics: bool = False,
    hidden: bool = False,
  ):
    """tokens [B,T] int (positions 0..T-1) -> (logits [B,T,V] f32, aux).

    aux: `moe_load` [L,E]; `topk_idx` {layer: [B,T,k]} of the CSA layers whose indexer ran;
    with an indexer loss, `indexer_kl` [n_CSA] (per CSA layer, mean over queries; the trainer
    averages the layers as for V3.2); with metrics, `indexer_recall` / `topk_overlap` [n_CSA];
    with mtp, `mtp_logits` [B,T,V] (position t predicts token t+2; the last two are
    meaningless), `mtp_moe_load`, and `mtp_indexer_kl` when the MTP layer is CSA.
    hidden: return the head's input [B,T,D] instead of the logits, and `mtp_hidden` instead of
    `mtp_logits` (losses.*_from_hidden apply `self.head` a chunk at a time).
    """
    attention_lib.check_mode(attention, indexer_loss)
    n = self.cfg.n_layers
    if (indexer_loss != "none" or metrics) and 4 not in self.cfg.compress_ratios[:n]:
      raise ValueError(
        f"indexer_loss={indexer_loss!r} / metrics={metrics} need a CSA layer (ratio 4); "
        f"compress_ratios={self.cfg.compress_ratios[:n]}"
      )
    e = self.embed_tokens(tokens)
    h = jnp.broadcast_to(e[:, :, None], e.shape[:2] + (self.cfg.hc_mult,) + e.shape[2:])
    loads, topk, per_layer = [], {}, {}
    kw = dict(attention=attention, indexer_loss=indexer_loss, metrics=metrics)
    policy = sparse_attention.REMAT_POLICIES[self.cfg.remat_policy]
    for blk in self.layers:
      if self.cfg.remat:  # the block's state goes in as an argument: nothing is written back
        graphdef, state = nnx.split(blk)
        run = lambda st, h, g=graphdef: nnx.merge(g, st)(h, tokens, **kw)
        h, aux = jax.checkpoint(run, policy=policy)(state, h)
      else:
        h, aux = blk(h, tokens, **kw)
      loads.append(aux["moe_load"])
      if "topk_idx" in aux:
        topk[blk.layer] = aux["topk_idx"]
      for name in ("indexer_kl", "indexer_recall", "topk_overlap"):
        if name in aux:
          per_layer.setdefault(name, []).append(aux[name])
    final = self.norm(self.hc_head(h))
    logits = final if hidden else self.head(final).astype(jnp.float32)
    out = {"moe_load": jnp.stack(loads), **{k: jnp.stack(v) for k, v in per_layer.items()}}
    if topk:
      out["topk_idx"] = topk
    if mtp and self.mtp is not None:
      nxt = jnp.roll(tokens, -1, axis=1)
      x, maux = self.mtp(
        h, self.embed_tokens(nxt), nxt, attention=attention, indexer_loss=indexer_loss
      )
      if hidden:
        out["mtp_hidden"] = x
      else:
        out["mtp_logits"] = self.head(x).astype(jnp.float32)
      out["mtp_moe_load"] = maux["moe_load"]
      if "indexer_kl" in maux:
        out["mtp_indexer_kl"] = maux["indexer_kl"]
    return logits, out


def build(cfg: V4Config, seed: int = 0, *, on_host: bool = True) -> V4Transformer:
  """Builds and initialises a V4 model (use `abstract` for the full sizes).

  on_host: numpy draws from the abstract model (fast), as `dsa_jax.model.build`; constants come
  from `init_value` metadata (hyper-connection scales 1), norm weights 1, everything else 0,
  hash tables the stand-in of `moe.hash_table`.
  """
  if not on_host:
    return V4Transformer(cfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(abstract(cfg))
  rng = np.random.default_rng(seed)
  table = moe_lib.hash_table(cfg)

  def init(path, var):
    meta = var.get_metadata()
    shape, dtype = var.get_value().shape, var.get_value().dtype
    if isinstance(var, moe_lib.HashTable):
      x = table
    elif "init_std" in meta:
      x = rng.standard_normal(shape, dtype=np.float32) * np.float32(meta["init_std"])
    elif "init_value" in meta:
      x = np.full(shape, meta["init_value"], np.float32)
    elif path[-1] == "weight":
      x = np.ones(shape, np.float32)
    else:
      x = np.zeros(shape, np.float32)
    return var.replace(value=jnp.asarray(x, dtype))

  return nnx.merge(graphdef, nnx.map_state(init, state))


def abstract(cfg: V4Config) -> V4Transformer:
  """The model with ShapeDtypeStruct leaves: nothing allocated (v4_flash, v4_pro)."""
  return nnx.eval_shape(lambda: V4Transformer(cfg, rngs=nnx.Rngs(0)))


def param_count(tree) -> int:
  """Elements of every parameter and router bias of a module or state (hash tables excluded)."""
  state = nnx.state(tree, nnx.Param, layers.RouterBias) if isinstance(tree, nnx.Module) else tree
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state) if hasattr(x, "shape")))


def param_counts(cfg: V4Config) -> dict[str, int]:
  """{"main", "mtp", "total"} parameter counts of the abstract model (docs/v4.md §Parameters)."""
  m = abstract(cfg)
  total = param_count(m)
  mtp = param_count(m.mtp) if m.mtp is not None else 0
  return {"main": total - mtp, "mtp": mtp, "total": total}
