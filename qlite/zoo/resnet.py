"""A tiny ResNet: conv-BN-relu stem, 3x3/2 SAME max pool, two basic blocks
(the second strided, with a 1x1 projection shortcut), global average pool,
dense head. Linen and NNX versions of one architecture."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from qlite.zoo import base

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
STEM = 16
# (out_channels, stride) of each basic block.
BLOCKS = ((16, 1), (32, 2))


class BasicBlock(nn.Module):
  """conv-BN-relu-conv-BN + shortcut, then relu (Linen)."""
  out_features: int
  strides: int

  @nn.compact
  def __call__(self, x):
    bn = lambda: nn.BatchNorm(use_running_average=True)
    y = nn.Conv(self.out_features, (3, 3), strides=self.strides,
                use_bias=False)(x)
    y = nn.relu(bn()(y))
    y = nn.Conv(self.out_features, (3, 3), use_bias=False)(y)
    y = bn()(y)
    if self.strides != 1 or x.shape[-1] != self.out_features:
      x = nn.Conv(self.out_features, (1, 1), strides=self.strides,
                  use_bias=False, name="shortcut")(x)
      x = nn.BatchNorm(use_running_average=True, name="shortcut_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Tiny ResNet classifier (Linen)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(STEM, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    for out, stride in BLOCKS:
      x = BasicBlock(out, stride)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(NUM_CLASSES)(x)


class BasicBlockNNX(nnx.Module):
  """conv-BN-relu-conv-BN + shortcut, then relu (NNX)."""

  def __init__(self, in_features: int, out_features: int, strides: int,
               *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_features, out_features, (3, 3), strides=strides,
                          use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(out_features, rngs=rngs)
    self.conv2 = nnx.Conv(out_features, out_features, (3, 3), use_bias=False,
                          rngs=rngs)
    self.bn2 = nnx.BatchNorm(out_features, rngs=rngs)
    if strides != 1 or in_features != out_features:
      self.shortcut = nnx.Conv(in_features, out_features, (1, 1),
                               strides=strides, use_bias=False, rngs=rngs)
      self.shortcut_bn = nnx.BatchNorm(out_features, rngs=rngs)
    else:
      self.shortcut = None
      self.shortcut_bn = None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.shortcut is not None:
      x = self.shortcut_bn(self.shortcut(x))
    return nnx.relu(x + y)


class ResNetNNX(nnx.Module):
  """Tiny ResNet classifier (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(INPUT_SHAPE[-1], STEM, (3, 3), use_bias=False,
                         rngs=rngs)
    self.stem_bn = nnx.BatchNorm(STEM, rngs=rngs)
    blocks, c = [], STEM
    for out, stride in BLOCKS:
      blocks.append(BasicBlockNNX(c, out, stride, rngs=rngs))
      c = out
    self.blocks = nnx.List(blocks)
    self.fc = nnx.Linear(c, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    x = nnx.max_pool(x, (3, 3), (2, 2), padding="SAME")
    for block in self.blocks:
      x = block(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.fc(x)


def build_linen(seed: int = 0) -> base.ZooModel:
  """Returns the Linen ResNet with seeded weights and BN statistics."""
  batches = base.uniform_batches(INPUT_SHAPE, seed=seed + 200)
  model = ResNet()
  variables = base.init_linen(model, seed, batches[0][:1])
  variables = base.randomize_batchnorm_linen(variables, seed + 1)
  return base.ZooModel("resnet/linen", model, variables,
                       base.example_from(batches), batches, "linen")


def build_nnx(seed: int = 0) -> base.ZooModel:
  """Returns the NNX ResNet (in eval mode) with seeded BN statistics."""
  batches = base.uniform_batches(INPUT_SHAPE, seed=seed + 200)
  model = base.init_nnx(lambda rngs: ResNetNNX(rngs=rngs), seed)
  base.randomize_batchnorm_nnx(model, seed + 1)
  model.eval()
  return base.ZooModel("resnet/nnx", model, None,
                       base.example_from(batches), batches, "nnx")
