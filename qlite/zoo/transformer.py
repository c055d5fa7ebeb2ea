"""A tiny transformer encoder classifier over float features [B, 16, 32]:
dense token embedding + learned positional embedding, two pre-LN encoder
layers (layer 1 uses Flax's multi-head attention module, layer 2 hand-written
einsum attention; one tanh-GELU MLP, one erf-GELU MLP), final LayerNorm, mean
over tokens, dense classifier. Linen and NNX versions of one architecture."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from qlite.zoo import base

SEQ_LEN = 16
IN_FEATURES = 32
D_MODEL = 64
NUM_HEADS = 4
HEAD_DIM = D_MODEL // NUM_HEADS
MLP_DIM = 128
NUM_CLASSES = 10


def einsum_attention(q, k, v):
  """Scaled dot-product attention on [B, T, H, D] q / k / v via einsum."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class EinsumSelfAttention(nn.Module):
  """Self-attention with hand-written q/k/v projections and einsums (Linen)."""
  d_model: int = D_MODEL

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    d = self.d_model
    split = lambda y: y.reshape(b, t, NUM_HEADS, d // NUM_HEADS)
    q = split(nn.Dense(d, name="query")(x))
    k = split(nn.Dense(d, name="key")(x))
    v = split(nn.Dense(d, name="value")(x))
    y = einsum_attention(q, k, v).reshape(b, t, d)
    return nn.Dense(d, name="out")(y)


class EncoderLayer(nn.Module):
  """Pre-LN encoder layer: LN, attention, residual, LN, GELU MLP, residual."""
  flax_attention: bool
  approximate_gelu: bool
  d_model: int = D_MODEL
  mlp_dim: int = MLP_DIM

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    if self.flax_attention:
      y = nn.MultiHeadDotProductAttention(num_heads=NUM_HEADS,
                                          qkv_features=self.d_model,
                                          deterministic=True)(y, y)
    else:
      y = EinsumSelfAttention(self.d_model)(y)
    x = x + y
    y = nn.LayerNorm()(x)
    y = nn.Dense(self.mlp_dim)(y)
    y = nn.gelu(y, approximate=self.approximate_gelu)
    y = nn.Dense(self.d_model)(y)
    return x + y


class Transformer(nn.Module):
  """Tiny transformer encoder classifier (Linen); ``width`` scales the model
  and MLP dims (the benchmark's scaling rows)."""
  width: int = 1

  @nn.compact
  def __call__(self, x):
    d, m = D_MODEL * self.width, MLP_DIM * self.width
    x = nn.Dense(d, name="embed")(x)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (1, SEQ_LEN, d))
    x = x + pos
    x = EncoderLayer(flax_attention=True, approximate_gelu=True,
                     d_model=d, mlp_dim=m)(x)
    x = EncoderLayer(flax_attention=False, approximate_gelu=False,
                     d_model=d, mlp_dim=m)(x)
    x = nn.LayerNorm()(x)
    x = jnp.mean(x, axis=1)
    return nn.Dense(NUM_CLASSES)(x)


class EinsumSelfAttentionNNX(nnx.Module):
  """Self-attention with hand-written q/k/v projections and einsums (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.query = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)
    self.key = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)
    self.value = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)
    self.out = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)

  def __call__(self, x):
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, NUM_HEADS, HEAD_DIM)
    y = einsum_attention(split(self.query(x)), split(self.key(x)),
                         split(self.value(x)))
    return self.out(y.reshape(b, t, D_MODEL))


class EncoderLayerNNX(nnx.Module):
  """Pre-LN encoder layer: LN, attention, residual, LN, GELU MLP, residual."""

  def __init__(self, flax_attention: bool, approximate_gelu: bool,
               *, rngs: nnx.Rngs):
    self.approximate_gelu = approximate_gelu
    self.ln1 = nnx.LayerNorm(D_MODEL, rngs=rngs)
    if flax_attention:
      self.attn = nnx.MultiHeadAttention(NUM_HEADS, D_MODEL,
                                         qkv_features=D_MODEL, decode=False,
                                         deterministic=True, rngs=rngs)
    else:
      self.attn = EinsumSelfAttentionNNX(rngs=rngs)
    self.ln2 = nnx.LayerNorm(D_MODEL, rngs=rngs)
    self.fc1 = nnx.Linear(D_MODEL, MLP_DIM, rngs=rngs)
    self.fc2 = nnx.Linear(MLP_DIM, D_MODEL, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    y = nnx.gelu(self.fc1(self.ln2(x)), approximate=self.approximate_gelu)
    return x + self.fc2(y)


class TransformerNNX(nnx.Module):
  """Tiny transformer encoder classifier (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.embed = nnx.Linear(IN_FEATURES, D_MODEL, rngs=rngs)
    self.pos_embedding = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, SEQ_LEN, D_MODEL)))
    self.layers = nnx.List([
        EncoderLayerNNX(True, True, rngs=rngs),
        EncoderLayerNNX(False, False, rngs=rngs),
    ])
    self.ln = nnx.LayerNorm(D_MODEL, rngs=rngs)
    self.fc = nnx.Linear(D_MODEL, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x) + self.pos_embedding[...]
    for layer in self.layers:
      x = layer(x)
    x = jnp.mean(self.ln(x), axis=1)
    return self.fc(x)


def build_linen(seed: int = 0) -> base.ZooModel:
  """Returns the Linen transformer with seeded weights."""
  batches = base.normal_batches((SEQ_LEN, IN_FEATURES), seed=seed + 300)
  model = Transformer()
  variables = base.init_linen(model, seed, batches[0][:1])
  return base.ZooModel("transformer/linen", model, variables,
                       base.example_from(batches), batches, "linen")


def build_nnx(seed: int = 0) -> base.ZooModel:
  """Returns the NNX transformer with seeded weights."""
  batches = base.normal_batches((SEQ_LEN, IN_FEATURES), seed=seed + 300)
  model = base.init_nnx(lambda rngs: TransformerNNX(rngs=rngs), seed)
  return base.ZooModel("transformer/nnx", model, None,
                       base.example_from(batches), batches, "nnx")
