"""A tiny convolutional autoencoder on [B, 16, 16, 3] images: an encoder of
two stride-2 3x3 convs (16 -> 8 -> 4), a 1x1 bottleneck conv, and a decoder
of two stride-2 ``ConvTranspose`` layers (4 -> 8 -> 16, SAME padding) and a
sigmoid, reconstructing the image. Linen and NNX versions of one
architecture."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from qlite.zoo import base

INPUT_SHAPE = (16, 16, 3)
C1, C2, LATENT = 16, 32, 8
DECODER_GAIN = 2.0


class Autoencoder(nn.Module):
  """Conv encoder / ConvTranspose decoder (Linen)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(C1, (3, 3), strides=(2, 2), name="enc1")(x))   # 8x8
    x = nn.relu(nn.Conv(C2, (3, 3), strides=(2, 2), name="enc2")(x))   # 4x4
    z = nn.Conv(LATENT, (1, 1), name="latent")(x)
    y = nn.relu(nn.ConvTranspose(C1, (3, 3), strides=(2, 2),
                                 name="dec1")(z))                      # 8x8
    return nn.ConvTranspose(INPUT_SHAPE[-1], (3, 3), strides=(2, 2),
                            name="dec2")(y)                            # 16x16


class AutoencoderNNX(nnx.Module):
  """Conv encoder / ConvTranspose decoder (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.enc1 = nnx.Conv(INPUT_SHAPE[-1], C1, (3, 3), strides=(2, 2),
                         rngs=rngs)
    self.enc2 = nnx.Conv(C1, C2, (3, 3), strides=(2, 2), rngs=rngs)
    self.latent = nnx.Conv(C2, LATENT, (1, 1), rngs=rngs)
    self.dec1 = nnx.ConvTranspose(LATENT, C1, (3, 3), strides=(2, 2),
                                  rngs=rngs)
    self.dec2 = nnx.ConvTranspose(C1, INPUT_SHAPE[-1], (3, 3), strides=(2, 2),
                                  rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.enc1(x))
    x = nnx.relu(self.enc2(x))
    y = nnx.relu(self.dec1(self.latent(x)))
    return self.dec2(y)


def build_linen(seed: int = 0) -> base.ZooModel:
  """Returns the Linen autoencoder with seeded weights."""
  batches = base.uniform_batches(INPUT_SHAPE, seed=seed + 1000)
  model = Autoencoder()
  variables = base.init_linen(model, seed, batches[0][:1])
  params = dict(variables["params"])
  for name in ("dec1", "dec2"):
    params[name] = {**params[name],
                    "kernel": params[name]["kernel"] * DECODER_GAIN}
  variables = {**variables, "params": params}
  return base.ZooModel("autoencoder/linen", model, variables,
                       base.example_from(batches), batches, "linen")


def build_nnx(seed: int = 0) -> base.ZooModel:
  """Returns the NNX autoencoder with seeded weights."""
  batches = base.uniform_batches(INPUT_SHAPE, seed=seed + 1000)
  model = base.init_nnx(lambda rngs: AutoencoderNNX(rngs=rngs), seed)
  for layer in (model.dec1, model.dec2):
    layer.kernel[...] = layer.kernel[...] * DECODER_GAIN
  return base.ZooModel("autoencoder/nnx", model, None,
                       base.example_from(batches), batches, "nnx")
