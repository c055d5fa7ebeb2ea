"""Attention modules several test files export."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class HeadsAttention(nn.Module):
  """ViT's / BERT's layout: 2 heads of 8, ``einsum("bhqk,bkhd->bqhd", p,
  v)``, which jax computes as ``dot_general(v, p)``: the probabilities on
  the matmul's right-hand side."""

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    q, k, v = (nn.Dense(16, name=n)(x).reshape(b, t, 2, 8)
               for n in ("q", "k", "v"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8.0)
    y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits), v)
    return nn.Dense(16, name="out")(y.reshape(b, t, 16))
