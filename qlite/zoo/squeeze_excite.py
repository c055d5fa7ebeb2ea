"""A tiny CNN with a squeeze-and-excitation block: strided conv stem + swish,
conv + hard-swish, SE block (global mean over H, W, dense reduce + relu,
dense expand + sigmoid, channel-wise gating), 1x1 conv + swish, global average
pool, dense head. Linen and NNX versions of one architecture."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from qlite.zoo import base

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
C1, C2, REDUCED, C3 = 16, 32, 8, 48


class SqueezeExcite(nn.Module):
  """Channel gating from globally pooled features (Linen)."""
  reduced: int

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2))
    s = nn.relu(nn.Dense(self.reduced, name="reduce")(s))
    s = nn.sigmoid(nn.Dense(x.shape[-1], name="expand")(s))
    return x * s[:, None, None, :]


class SENet(nn.Module):
  """Tiny SE classifier (Linen)."""

  @nn.compact
  def __call__(self, x):
    x = nn.swish(nn.Conv(C1, (3, 3), strides=2, name="stem")(x))
    x = nn.hard_swish(nn.Conv(C2, (3, 3), name="conv")(x))
    x = SqueezeExcite(REDUCED, name="se")(x)
    x = nn.swish(nn.Conv(C3, (1, 1), name="pointwise")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(NUM_CLASSES, name="head")(x)


class SqueezeExciteNNX(nnx.Module):
  """Channel gating from globally pooled features (NNX)."""

  def __init__(self, channels: int, reduced: int, *, rngs: nnx.Rngs):
    self.reduce = nnx.Linear(channels, reduced, rngs=rngs)
    self.expand = nnx.Linear(reduced, channels, rngs=rngs)

  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2))
    s = nnx.sigmoid(self.expand(nnx.relu(self.reduce(s))))
    return x * s[:, None, None, :]


class SENetNNX(nnx.Module):
  """Tiny SE classifier (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(INPUT_SHAPE[-1], C1, (3, 3), strides=2, rngs=rngs)
    self.conv = nnx.Conv(C1, C2, (3, 3), rngs=rngs)
    self.se = SqueezeExciteNNX(C2, REDUCED, rngs=rngs)
    self.pointwise = nnx.Conv(C2, C3, (1, 1), rngs=rngs)
    self.head = nnx.Linear(C3, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.swish(self.stem(x))
    x = nnx.hard_swish(self.conv(x))
    x = self.se(x)
    x = nnx.swish(self.pointwise(x))
    return self.head(jnp.mean(x, axis=(1, 2)))


def build_linen(seed: int = 0) -> base.ZooModel:
  """Returns the Linen SE net with seeded weights."""
  batches = base.uniform_batches(INPUT_SHAPE, seed=seed + 600)
  model = SENet()
  variables = base.init_linen(model, seed, batches[0][:1])
  return base.ZooModel("squeeze_excite/linen", model, variables,
                       base.example_from(batches), batches, "linen")


def build_nnx(seed: int = 0) -> base.ZooModel:
  """Returns the NNX SE net with seeded weights."""
  batches = base.uniform_batches(INPUT_SHAPE, seed=seed + 600)
  model = base.init_nnx(lambda rngs: SENetNNX(rngs=rngs), seed)
  return base.ZooModel("squeeze_excite/nnx", model, None,
                       base.example_from(batches), batches, "nnx")
