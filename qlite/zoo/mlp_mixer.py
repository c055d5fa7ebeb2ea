"""A tiny MLP-Mixer: 4x4 patch-embedding conv (stride 4) on 32x32 images,
two mixer blocks (LayerNorm, token-mixing MLP across the transposed token
axis, residual; LayerNorm, channel-mixing MLP, residual), final LayerNorm,
mean over tokens, dense head. Linen and NNX versions of one architecture."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from qlite.zoo import base

INPUT_SHAPE = (32, 32, 3)
PATCH = 4
TOKENS = (INPUT_SHAPE[0] // PATCH) * (INPUT_SHAPE[1] // PATCH)
HIDDEN = 32
TOKEN_MLP = 32
CHANNEL_MLP = 64
NUM_BLOCKS = 2
NUM_CLASSES = 10


class MlpBlock(nn.Module):
  """Dense, GELU, Dense back to the input width (Linen)."""
  hidden: int

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.hidden)(x))
    return nn.Dense(x.shape[-1])(y)


class MixerBlock(nn.Module):
  """Token mixing then channel mixing, each pre-LN with a residual (Linen)."""

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    y = jnp.swapaxes(y, 1, 2)                  # [B, C, T]
    y = MlpBlock(TOKEN_MLP, name="token_mixing")(y)
    x = x + jnp.swapaxes(y, 1, 2)
    y = nn.LayerNorm()(x)
    return x + MlpBlock(CHANNEL_MLP, name="channel_mixing")(y)


class MlpMixer(nn.Module):
  """Tiny MLP-Mixer classifier (Linen)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(HIDDEN, (PATCH, PATCH), strides=PATCH, padding="VALID",
                name="stem")(x)
    x = x.reshape(x.shape[0], -1, HIDDEN)      # [B, T, C]
    for _ in range(NUM_BLOCKS):
      x = MixerBlock()(x)
    x = nn.LayerNorm()(x)
    return nn.Dense(NUM_CLASSES, name="head")(jnp.mean(x, axis=1))


class MlpBlockNNX(nnx.Module):
  """Dense, GELU, Dense back to the input width (NNX)."""

  def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(features, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, features, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.gelu(self.fc1(x)))


class MixerBlockNNX(nnx.Module):
  """Token mixing then channel mixing, each pre-LN with a residual (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(HIDDEN, rngs=rngs)
    self.token_mixing = MlpBlockNNX(TOKENS, TOKEN_MLP, rngs=rngs)
    self.ln2 = nnx.LayerNorm(HIDDEN, rngs=rngs)
    self.channel_mixing = MlpBlockNNX(HIDDEN, CHANNEL_MLP, rngs=rngs)

  def __call__(self, x):
    y = self.token_mixing(jnp.swapaxes(self.ln1(x), 1, 2))
    x = x + jnp.swapaxes(y, 1, 2)
    return x + self.channel_mixing(self.ln2(x))


class MlpMixerNNX(nnx.Module):
  """Tiny MLP-Mixer classifier (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(INPUT_SHAPE[-1], HIDDEN, (PATCH, PATCH),
                         strides=PATCH, padding="VALID", rngs=rngs)
    self.blocks = nnx.List([MixerBlockNNX(rngs=rngs)
                            for _ in range(NUM_BLOCKS)])
    self.ln = nnx.LayerNorm(HIDDEN, rngs=rngs)
    self.head = nnx.Linear(HIDDEN, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    x = x.reshape(x.shape[0], -1, HIDDEN)
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(self.ln(x), axis=1))


def build_linen(seed: int = 0) -> base.ZooModel:
  """Returns the Linen MLP-Mixer with seeded weights."""
  batches = base.uniform_batches(INPUT_SHAPE, seed=seed + 700)
  model = MlpMixer()
  variables = base.init_linen(model, seed, batches[0][:1])
  return base.ZooModel("mlp_mixer/linen", model, variables,
                       base.example_from(batches), batches, "linen")


def build_nnx(seed: int = 0) -> base.ZooModel:
  """Returns the NNX MLP-Mixer with seeded weights."""
  batches = base.uniform_batches(INPUT_SHAPE, seed=seed + 700)
  model = base.init_nnx(lambda rngs: MlpMixerNNX(rngs=rngs), seed)
  return base.ZooModel("mlp_mixer/nnx", model, None,
                       base.example_from(batches), batches, "nnx")
