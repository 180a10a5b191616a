# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""DeepSeek-V3.2-Exp transformer (docs/dsa.md §Model): pre-norm blocks of MLA+DSA and dense/MoE
FFN, scanned layer stacks, and the multi-token-prediction (MTP) module.

Layers are stored stacked (leading layer axis, built with nnx.vmap) in two stacks, `dense_layers`
(the first n_dense_layers, SwiGLU FFN) and `moe_layers`, and run with lax.scan over the stack.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsa_jax import layers, mla, moe, sparse_attention
from dsa_jax.config import ModelConfig
from dsa_jax.v4 import model as v4_model
from dsa_jax.v4.config import V4Config


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, use_moe: bool, *, rngs: nnx.Rngs):
    self.attn_norm = layers.RMSNorm(cfg.dim, cfg.norm_eps)
    self.attn = mla.MLA(cfg, rngs=rngs)
    self.ffn_norm = layers.RMSNorm(cfg.dim, cfg.norm_eps)
    self.use_moe = use_moe
    if use_moe:
      self.ffn = moe.MoE(cfg, rngs=rngs)
    else:
      self.ffn = moe.MLP(cfg.dim, cfg.inter_dim, cfg, rngs=rngs)

  def __call__(self, h, cos, sin, **attn_kw):
    a, aux = self.attn(self.attn_norm(h), cos, sin, **attn_kw)
    h = h + a
    y = self.ffn_norm(h)
    if self.use_moe:
      f, load = self.ffn(y)
      aux["moe_load"] = load
    else:
      f = self.ffn(y)
    return h + f, aux


def _stack(n: int, make, rngs: nnx.Rngs):
  """n independently initialised copies of a module, stacked on a leading layer axis."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(r):
    return make(r)

  return create(rngs)


def _run_stack(stack, h, cos, sin, remat: bool, policy: str = "full", **attn_kw):
  graphdef, state = nnx.split(stack)

  def body(carry, st):
    blk = nnx.merge(graphdef, st)
    return blk(carry, cos, sin, **attn_kw)

  if remat:
    body = jax.checkpoint(body, policy=sparse_attention.REMAT_POLICIES[policy])
  return jax.lax.scan(body, h, state)


class MTP(nnx.Module):
  """One MTP depth (DeepSeek-V3 §2.2): predicts token t+2 from h_t and the embedding of t+1.

  h' = Block(eh_proj([enorm(emb(x_{t+1})) ; hnorm(h_t)])), logits = head(shared_head.norm(h')).
  Embedding and output head are shared with the main model (stored again in HF checkpoints).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.enorm = layers.RMSNorm(cfg.dim, cfg.norm_eps)
    self.hnorm = layers.RMSNorm(cfg.dim, cfg.norm_eps)
    self.eh_proj = layers.Linear(2 * cfg.dim, cfg.dim, ("embed2", "embed"), cfg, rngs=rngs)
    self.block = Block(cfg, cfg.n_layers > cfg.n_dense_layers, rngs=rngs)
    self.norm = layers.RMSNorm(cfg.dim, cfg.norm_eps)

  def __call__(self, h, emb_next, cos, sin, **attn_kw):
    x = self.eh_proj(jnp.concatenate([self.enorm(emb_next), self.hnorm(h)], axis=-1))
    x, aux = self.block(x, cos, sin, **attn_kw)
    return self.norm(x), aux


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = layers.dtype_of(cfg.param_dtype)
    self.embed = layers.param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), 1.0, pd)
    self.dense_layers = (
      _stack(cfg.n_dense_layers, lambda r: Block(cfg, False, rngs=r), rngs)
      if cfg.n_dense_layers
      else None
    )
    self.moe_layers = (
      _stack(cfg.n_moe_layers, lambda r: Block(cfg, True, rngs=r), rngs)
      if cfg.n_moe_layers
      else None
    )
    self.norm = layers.RMSNorm(cfg.dim, cfg.norm_eps)
    self.head = layers.Linear(cfg.dim, cfg.vocab_size, ("embed", "vocab"), cfg, rngs=rngs)
    self.mtp = MTP(cfg, rngs=rngs) if cfg.n_mtp_layers else None

  def embed_tokens(self, tokens):
    """tokens [B,T] int -> embeddings [B,T,D] in the compute dtype."""
    return self.embed[...][tokens].astype(layers.dtype_of(self.cfg.compute_dtype))

  def __call__(
    self,
    tokens,
    *,
    attention: str = "dense",
    indexer_loss: str = "none",
    metrics: bool = False,
    mtp: bool = False,
    positions=None,
    hidden: bool = False,
  ):
    """tokens [B,T] int -> (logits [B,T,V] f32, aux).

    aux holds per-layer arrays (layer axis first, dense layers then MoE layers): `indexer_kl`,
    `indexer_recall`, `topk_overlap` when requested; `moe_load` [L_moe, E]; `mtp_logits`
    [B,T,V] (position t predicts token t+2; the last two positions are meaningless) when mtp.
    hidden: return the head's input [B,T,D] (normed) instead of the logits, and `mtp_hidden`
    instead of `mtp_logits` (losses.*_from_hidden apply `self.head` a chunk at a time).
    """
    cfg = self.cfg
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    cos, sin = layers.rope_angles(cfg, positions)
    kw = dict(attention=attention, indexer_loss=indexer_loss, metrics=metrics)
    h = self.embed_tokens(tokens)
    auxes = []
    for stack in (self.dense_layers, self.moe_layers):
      if stack is not None:
        h, aux = _run_stack(stack, h, cos, sin, cfg.remat, cfg.remat_policy, **kw)
        auxes.append(aux)
    out = {}
    for key in ("indexer_kl", "indexer_recall", "topk_overlap"):
      vals = [a[key] for a in auxes if key in a]
      if vals:
        out[key] = jnp.concatenate(vals)
    if self.moe_layers is not None:
      out["moe_load"] = auxes[-1]["moe_load"]
    final = self.norm(h)
    logits = final if hidden else self.head(final).astype(jnp.float32)
    if mtp and self.mtp is not None:
      emb_next = self.embed_tokens(jnp.roll(tokens, -1, axis=1))
      hm, maux = self.mtp(h, emb_next, cos, sin, **kw)
      if hidden:
        out["mtp_hidden"] = hm
      else:
        out["mtp_logits"] = self.head(hm).astype(jnp.float32)
      for key in ("indexer_kl", "indexer_recall", "topk_overlap"):
        if key in maux:
          out["mtp_" + key] = maux[key]
      if "moe_load" in maux:
        out["mtp_moe_load"] = maux["moe_load"]
    return logits, out


def build(cfg: ModelConfig | V4Config, seed: int = 0, *, on_host: bool = True) -> Transformer:
  """Builds and initialises a model (use `abstract` for sizes that must not be allocated).

  on_host: draw the normal initialisers with numpy from the abstract model (seconds), instead of
  compiling the jax.random init graph (XLA:CPU takes ~20 s for it even at the test size). Norm
  weights start at 1, biases (LayerNorm, router) at 0, as in the jax initialisers.
  """
  if isinstance(cfg, V4Config):
    return v4_model.build(cfg, seed, on_host=on_host)
  if not on_host:
    return Transformer(cfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(abstract(cfg))
  rng = np.random.default_rng(seed)

  def init(path, var):
    meta = var.get_metadata()
    shape, dtype = var.get_value().shape, var.get_value().dtype
    if "init_std" in meta:
      x = rng.standard_normal(shape, dtype=np.float32) * np.float32(meta["init_std"])
    elif path[-1] == "weight":
      x = np.ones(shape, np.float32)
    else:
      x = np.zeros(shape, np.float32)
    return var.replace(value=jnp.asarray(x, dtype))

  state = nnx.map_state(init, state)
  return nnx.merge(graphdef, state)


def abstract(cfg: ModelConfig | V4Config) -> Transformer:
  """The model with ShapeDtypeStruct leaves: nothing allocated (e.g. the 671B config)."""
  if isinstance(cfg, V4Config):
    return v4_model.abstract(cfg)
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def param_count(tree) -> int:
  """Number of elements in every array of a module or state (Params and router biases)."""
  state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree
  leaves = jax.tree.leaves(state)
  return int(sum(math.prod(x.shape) for x in leaves if hasattr(x, "shape")))
