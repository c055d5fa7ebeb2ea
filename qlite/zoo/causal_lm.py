"""A tiny causal decoder language model over int32 token ids [B, 16]:
``Embed``, two pre-RMSNorm decoder layers (layer 1: hand-written attention
with rotary position embeddings on static positions and a
``jnp.where(causal, logits, finfo.min)`` mask; layer 2: Flax's multi-head
attention module with ``make_causal_mask``), SiLU-gated MLPs, a final
RMSNorm and a dense LM head giving per-token logits [B, 16, 64]. Linen and
NNX versions of one architecture."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from qlite.zoo import base

VOCAB = 64
SEQ_LEN = 16
D_MODEL = 32
NUM_HEADS = 4
HEAD_DIM = D_MODEL // NUM_HEADS
MLP_DIM = 64
ROPE_BASE = 10000.0


def token_batches(*, seed: int, num: int = base.NUM_BATCHES,
                  batch_size: int = base.BATCH_SIZE) -> list:
  """``num`` seeded int32 token-id batches of ``(batch_size, SEQ_LEN)``."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, (batch_size, SEQ_LEN)).astype(np.int32)
          for _ in range(num)]


def rotary(x):
  """Rotary position embedding of [B, T, H, D] q or k at positions
  ``arange(T)`` (static: the sin / cos tables are constants)."""
  t, d = x.shape[1], x.shape[-1]
  inv_freq = 1.0 / (ROPE_BASE ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def causal_attention(q, k, v):
  """Causal scaled dot-product attention on [B, T, H, D] q / k / v, the
  future masked with ``jnp.finfo(float32).min`` before the softmax."""
  t = q.shape[1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class RotaryAttention(nn.Module):
  """Causal self-attention with rotary q / k (Linen)."""

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, NUM_HEADS, HEAD_DIM)
    q = rotary(split(nn.Dense(D_MODEL, use_bias=False, name="query")(x)))
    k = rotary(split(nn.Dense(D_MODEL, use_bias=False, name="key")(x)))
    v = split(nn.Dense(D_MODEL, use_bias=False, name="value")(x))
    y = causal_attention(q, k, v).reshape(b, t, D_MODEL)
    return nn.Dense(D_MODEL, use_bias=False, name="out")(y)


class GatedMLP(nn.Module):
  """SiLU-gated MLP: ``down(silu(gate(x)) * up(x))`` (Linen)."""

  @nn.compact
  def __call__(self, x):
    g = nn.Dense(MLP_DIM, use_bias=False, name="gate")(x)
    u = nn.Dense(MLP_DIM, use_bias=False, name="up")(x)
    return nn.Dense(D_MODEL, use_bias=False, name="down")(nn.silu(g) * u)


class DecoderLayer(nn.Module):
  """Pre-RMSNorm decoder layer: norm, causal attention, residual, norm,
  gated MLP, residual (Linen)."""
  flax_attention: bool

  @nn.compact
  def __call__(self, x):
    y = nn.RMSNorm(name="attn_norm")(x)
    if self.flax_attention:
      mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
      y = nn.MultiHeadDotProductAttention(
          num_heads=NUM_HEADS, qkv_features=D_MODEL, use_bias=False,
          deterministic=True, name="attn")(y, y, mask=mask)
    else:
      y = RotaryAttention(name="attn")(y)
    x = x + y
    return x + GatedMLP(name="mlp")(nn.RMSNorm(name="mlp_norm")(x))


class CausalLM(nn.Module):
  """Tiny causal decoder LM (Linen): int32 ids [B, T] -> logits [B, T, V]."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, D_MODEL, name="embed")(ids)
    x = DecoderLayer(flax_attention=False, name="layer0")(x)
    x = DecoderLayer(flax_attention=True, name="layer1")(x)
    x = nn.RMSNorm(name="final_norm")(x)
    return nn.Dense(VOCAB, use_bias=False, name="lm_head")(x)


class RotaryAttentionNNX(nnx.Module):
  """Causal self-attention with rotary q / k (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    lin = lambda: nnx.Linear(D_MODEL, D_MODEL, use_bias=False, rngs=rngs)
    self.query, self.key, self.value, self.out = lin(), lin(), lin(), lin()

  def __call__(self, x):
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, NUM_HEADS, HEAD_DIM)
    q = rotary(split(self.query(x)))
    k = rotary(split(self.key(x)))
    y = causal_attention(q, k, split(self.value(x)))
    return self.out(y.reshape(b, t, D_MODEL))


class GatedMLPNNX(nnx.Module):
  """SiLU-gated MLP: ``down(silu(gate(x)) * up(x))`` (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.gate = nnx.Linear(D_MODEL, MLP_DIM, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(D_MODEL, MLP_DIM, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(MLP_DIM, D_MODEL, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.silu(self.gate(x)) * self.up(x))


class DecoderLayerNNX(nnx.Module):
  """Pre-RMSNorm decoder layer (NNX)."""

  def __init__(self, flax_attention: bool, *, rngs: nnx.Rngs):
    self.flax_attention = flax_attention
    self.attn_norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
    if flax_attention:
      self.attn = nnx.MultiHeadAttention(NUM_HEADS, D_MODEL,
                                         qkv_features=D_MODEL, use_bias=False,
                                         decode=False, deterministic=True,
                                         rngs=rngs)
    else:
      self.attn = RotaryAttentionNNX(rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
    self.mlp = GatedMLPNNX(rngs=rngs)

  def __call__(self, x):
    y = self.attn_norm(x)
    if self.flax_attention:
      y = self.attn(y, mask=nnx.make_causal_mask(
          jnp.ones(x.shape[:2], jnp.int32)))
    else:
      y = self.attn(y)
    x = x + y
    return x + self.mlp(self.mlp_norm(x))


class CausalLMNNX(nnx.Module):
  """Tiny causal decoder LM (NNX): int32 ids [B, T] -> logits [B, T, V]."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
    self.layers = nnx.List([DecoderLayerNNX(False, rngs=rngs),
                            DecoderLayerNNX(True, rngs=rngs)])
    self.final_norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
    self.lm_head = nnx.Linear(D_MODEL, VOCAB, use_bias=False, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(self.final_norm(x))


def build_linen(seed: int = 0) -> base.ZooModel:
  """Returns the Linen causal LM with seeded weights."""
  batches = token_batches(seed=seed + 800)
  model = CausalLM()
  variables = base.init_linen(model, seed, batches[0][:1])
  return base.ZooModel("causal_lm/linen", model, variables,
                       base.example_from(batches), batches, "linen")


def build_nnx(seed: int = 0) -> base.ZooModel:
  """Returns the NNX causal LM with seeded weights."""
  batches = token_batches(seed=seed + 800)
  model = base.init_nnx(lambda rngs: CausalLMNNX(rngs=rngs), seed)
  return base.ZooModel("causal_lm/nnx", model, None,
                       base.example_from(batches), batches, "nnx")
