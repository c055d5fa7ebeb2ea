"""A tiny 1-D temporal conv net over [B, 32, 8] sequences: 1x1 input
projection, three residual blocks of dilated 3-tap convs (dilation 1, 2, 4)
+ relu, a 1-D max pool and a 1-D average pool, mean over time, dense head.
Linen and NNX versions of one architecture."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from qlite.zoo import base

SEQ_LEN = 32
IN_CHANNELS = 8
CHANNELS = 32
DILATIONS = (1, 2, 4)
NUM_CLASSES = 6


def _pool(x, i: int):
  """The pooling after block ``i``: max after the 2nd, average after the 3rd
  (so the 1-D max pool and 1-D average pool both appear)."""
  if i == 1:
    return nn.max_pool(x, (2,), (2,))
  if i == 2:
    return nn.avg_pool(x, (2,), (2,))
  return x


class TCN(nn.Module):
  """Tiny temporal conv net (Linen)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(CHANNELS, (1,), name="proj")(x)
    for i, d in enumerate(DILATIONS):
      y = nn.relu(nn.Conv(CHANNELS, kernel_size=(3,), kernel_dilation=(d,),
                          name=f"dilated{d}")(x))
      x = _pool(x + y, i)
    x = jnp.mean(x, axis=1)
    return nn.Dense(NUM_CLASSES)(x)


class TCNNNX(nnx.Module):
  """Tiny temporal conv net (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.proj = nnx.Conv(IN_CHANNELS, CHANNELS, (1,), rngs=rngs)
    self.convs = nnx.List([
        nnx.Conv(CHANNELS, CHANNELS, kernel_size=(3,), kernel_dilation=(d,),
                 rngs=rngs) for d in DILATIONS])
    self.fc = nnx.Linear(CHANNELS, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    x = self.proj(x)
    for i, conv in enumerate(self.convs):
      x = _pool(x + nnx.relu(conv(x)), i)
    x = jnp.mean(x, axis=1)
    return self.fc(x)


def build_linen(seed: int = 0) -> base.ZooModel:
  """Returns the Linen TCN with seeded weights (standard-normal inputs)."""
  batches = base.normal_batches((SEQ_LEN, IN_CHANNELS), seed=seed + 500)
  model = TCN()
  variables = base.init_linen(model, seed, batches[0][:1])
  return base.ZooModel("tcn/linen", model, variables,
                       base.example_from(batches), batches, "linen")


def build_nnx(seed: int = 0) -> base.ZooModel:
  """Returns the NNX TCN with seeded weights (standard-normal inputs)."""
  batches = base.normal_batches((SEQ_LEN, IN_CHANNELS), seed=seed + 500)
  model = base.init_nnx(lambda rngs: TCNNNX(rngs=rngs), seed)
  return base.ZooModel("tcn/nnx", model, None,
                       base.example_from(batches), batches, "nnx")
