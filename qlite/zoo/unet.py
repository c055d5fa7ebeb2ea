"""A tiny two-level U-Net for per-pixel classification: conv+relu encoder,
max-pool downsampling, bottleneck conv, 2x upsampling by ``jax.image.resize``
("nearest" at the deep level, "bilinear" at the shallow one), channel concat
of the skip connections, conv, final 1x1 conv. Linen and NNX versions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from qlite.zoo import base

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 4
C1, C2, C3 = 8, 16, 32


def upsample2x(x, method: str):
  """Doubles H and W of an NHWC tensor with ``jax.image.resize``."""
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), method)


class UNet(nn.Module):
  """Tiny U-Net (Linen)."""

  @nn.compact
  def __call__(self, x):
    s1 = nn.relu(nn.Conv(C1, (3, 3), name="enc1")(x))                # 32x32
    s2 = nn.relu(nn.Conv(C2, (3, 3), name="enc2")(
        nn.max_pool(s1, (2, 2), (2, 2))))                             # 16x16
    b = nn.relu(nn.Conv(C3, (3, 3), name="bottleneck")(
        nn.max_pool(s2, (2, 2), (2, 2))))                             # 8x8
    y = jnp.concatenate([upsample2x(b, "nearest"), s2], axis=-1)
    y = nn.relu(nn.Conv(C2, (3, 3), name="dec2")(y))                 # 16x16
    y = jnp.concatenate([upsample2x(y, "bilinear"), s1], axis=-1)
    y = nn.relu(nn.Conv(C1, (3, 3), name="dec1")(y))                 # 32x32
    return nn.Conv(NUM_CLASSES, (1, 1), name="head")(y)


class UNetNNX(nnx.Module):
  """Tiny U-Net (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.enc1 = nnx.Conv(INPUT_SHAPE[-1], C1, (3, 3), rngs=rngs)
    self.enc2 = nnx.Conv(C1, C2, (3, 3), rngs=rngs)
    self.bottleneck = nnx.Conv(C2, C3, (3, 3), rngs=rngs)
    self.dec2 = nnx.Conv(C3 + C2, C2, (3, 3), rngs=rngs)
    self.dec1 = nnx.Conv(C2 + C1, C1, (3, 3), rngs=rngs)
    self.head = nnx.Conv(C1, NUM_CLASSES, (1, 1), rngs=rngs)

  def __call__(self, x):
    s1 = nnx.relu(self.enc1(x))
    s2 = nnx.relu(self.enc2(nnx.max_pool(s1, (2, 2), (2, 2))))
    b = nnx.relu(self.bottleneck(nnx.max_pool(s2, (2, 2), (2, 2))))
    y = jnp.concatenate([upsample2x(b, "nearest"), s2], axis=-1)
    y = nnx.relu(self.dec2(y))
    y = jnp.concatenate([upsample2x(y, "bilinear"), s1], axis=-1)
    y = nnx.relu(self.dec1(y))
    return self.head(y)


def build_linen(seed: int = 0) -> base.ZooModel:
  """Returns the Linen U-Net with seeded weights."""
  batches = base.uniform_batches(INPUT_SHAPE, seed=seed + 400)
  model = UNet()
  variables = base.init_linen(model, seed, batches[0][:1])
  return base.ZooModel("unet/linen", model, variables,
                       base.example_from(batches), batches, "linen")


def build_nnx(seed: int = 0) -> base.ZooModel:
  """Returns the NNX U-Net with seeded weights."""
  batches = base.uniform_batches(INPUT_SHAPE, seed=seed + 400)
  model = base.init_nnx(lambda rngs: UNetNNX(rngs=rngs), seed)
  return base.ZooModel("unet/nnx", model, None,
                       base.example_from(batches), batches, "nnx")
