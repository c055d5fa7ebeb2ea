"""The zoo's tiny transformer (``qlite/zoo/transformer.py``) with its width
as a parameter, for the export-cost scaling rows of ``bench/odml.py``.

The zoo module fixes its dims as module constants, so this re-states the
same architecture (dense embedding + learned positions, a pre-LN layer with
Flax multi-head attention and tanh-GELU MLP, a pre-LN layer with einsum
attention and erf-GELU MLP, final LayerNorm, mean over tokens, dense head)
with ``d_model = 64 * width`` and ``mlp_dim = 128 * width``; ``width=1`` is
the zoo model's shape exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from qlite.zoo import transformer as zoo_transformer

SEQ_LEN = zoo_transformer.SEQ_LEN
IN_FEATURES = zoo_transformer.IN_FEATURES
NUM_HEADS = zoo_transformer.NUM_HEADS
NUM_CLASSES = zoo_transformer.NUM_CLASSES


def _einsum_attention(q, k, v):
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


class _EinsumSelfAttention(nn.Module):
  d_model: int

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, NUM_HEADS, self.d_model // NUM_HEADS)
    q = split(nn.Dense(self.d_model, name="query")(x))
    k = split(nn.Dense(self.d_model, name="key")(x))
    v = split(nn.Dense(self.d_model, name="value")(x))
    y = _einsum_attention(q, k, v).reshape(b, t, self.d_model)
    return nn.Dense(self.d_model, name="out")(y)


class _EncoderLayer(nn.Module):
  d_model: int
  mlp_dim: int
  flax_attention: bool
  approximate_gelu: bool

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    if self.flax_attention:
      y = nn.MultiHeadDotProductAttention(num_heads=NUM_HEADS,
                                          qkv_features=self.d_model,
                                          deterministic=True)(y, y)
    else:
      y = _EinsumSelfAttention(self.d_model)(y)
    x = x + y
    y = nn.LayerNorm()(x)
    y = nn.Dense(self.mlp_dim)(y)
    y = nn.gelu(y, approximate=self.approximate_gelu)
    y = nn.Dense(self.d_model)(y)
    return x + y


class WideTransformer(nn.Module):
  """The zoo transformer at ``width`` times its model / MLP width (Linen)."""
  width: int = 1

  @nn.compact
  def __call__(self, x):
    d, m = zoo_transformer.D_MODEL * self.width, \
        zoo_transformer.MLP_DIM * self.width
    x = nn.Dense(d, name="embed")(x)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (1, SEQ_LEN, d))
    x = x + pos
    x = _EncoderLayer(d, m, True, True)(x)
    x = _EncoderLayer(d, m, False, False)(x)
    x = nn.LayerNorm()(x)
    x = jnp.mean(x, axis=1)
    return nn.Dense(NUM_CLASSES)(x)
