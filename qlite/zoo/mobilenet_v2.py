"""A tiny MobileNetV2: conv-BN-relu6 stem, three inverted residual blocks
(1x1 expand, 3x3 depthwise, 1x1 project, residual when shapes match), global
average pool, dense head. Linen and NNX versions of one architecture."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from qlite.zoo import base

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
STEM = 16
EXPAND = 4
# (out_channels, stride) of each inverted residual block.
BLOCKS = ((16, 1), (24, 2), (24, 1))
HEAD = 64


class InvertedResidual(nn.Module):
  """1x1 expand + relu6, 3x3 depthwise + relu6, 1x1 project (Linen)."""
  out_features: int
  strides: int

  @nn.compact
  def __call__(self, x):
    c_in = x.shape[-1]
    hidden = c_in * EXPAND
    bn = lambda: nn.BatchNorm(use_running_average=True)
    y = nn.Conv(hidden, (1, 1), use_bias=False)(x)
    y = nn.relu6(bn()(y))
    y = nn.Conv(hidden, (3, 3), strides=self.strides, use_bias=False,
                feature_group_count=hidden)(y)
    y = nn.relu6(bn()(y))
    y = nn.Conv(self.out_features, (1, 1), use_bias=False)(y)
    y = bn()(y)
    if self.strides == 1 and c_in == self.out_features:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  """Tiny MobileNetV2 classifier (Linen)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(STEM, (3, 3), strides=2, use_bias=False)(x)
    x = nn.relu6(nn.BatchNorm(use_running_average=True)(x))
    for out, stride in BLOCKS:
      x = InvertedResidual(out, stride)(x)
    x = nn.Conv(HEAD, (1, 1), use_bias=False)(x)
    x = nn.relu6(nn.BatchNorm(use_running_average=True)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(NUM_CLASSES)(x)


class InvertedResidualNNX(nnx.Module):
  """1x1 expand + relu6, 3x3 depthwise + relu6, 1x1 project (NNX)."""

  def __init__(self, in_features: int, out_features: int, strides: int,
               *, rngs: nnx.Rngs):
    hidden = in_features * EXPAND
    self.residual = strides == 1 and in_features == out_features
    self.expand = nnx.Conv(in_features, hidden, (1, 1), use_bias=False,
                           rngs=rngs)
    self.bn1 = nnx.BatchNorm(hidden, rngs=rngs)
    self.depthwise = nnx.Conv(hidden, hidden, (3, 3), strides=strides,
                              feature_group_count=hidden, use_bias=False,
                              rngs=rngs)
    self.bn2 = nnx.BatchNorm(hidden, rngs=rngs)
    self.project = nnx.Conv(hidden, out_features, (1, 1), use_bias=False,
                            rngs=rngs)
    self.bn3 = nnx.BatchNorm(out_features, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu6(self.bn1(self.expand(x)))
    y = nnx.relu6(self.bn2(self.depthwise(y)))
    y = self.bn3(self.project(y))
    return x + y if self.residual else y


class MobileNetV2NNX(nnx.Module):
  """Tiny MobileNetV2 classifier (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(INPUT_SHAPE[-1], STEM, (3, 3), strides=2,
                         use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(STEM, rngs=rngs)
    blocks, c = [], STEM
    for out, stride in BLOCKS:
      blocks.append(InvertedResidualNNX(c, out, stride, rngs=rngs))
      c = out
    self.blocks = nnx.List(blocks)
    self.head = nnx.Conv(c, HEAD, (1, 1), use_bias=False, rngs=rngs)
    self.head_bn = nnx.BatchNorm(HEAD, rngs=rngs)
    self.fc = nnx.Linear(HEAD, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu6(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    x = nnx.relu6(self.head_bn(self.head(x)))
    x = jnp.mean(x, axis=(1, 2))
    return self.fc(x)


def build_linen(seed: int = 0) -> base.ZooModel:
  """Returns the Linen MobileNetV2 with seeded weights and BN statistics."""
  batches = base.uniform_batches(INPUT_SHAPE, seed=seed + 100)
  model = MobileNetV2()
  variables = base.init_linen(model, seed, batches[0][:1])
  variables = base.randomize_batchnorm_linen(variables, seed + 1)
  return base.ZooModel("mobilenet_v2/linen", model, variables,
                       base.example_from(batches), batches, "linen")


def build_nnx(seed: int = 0) -> base.ZooModel:
  """Returns the NNX MobileNetV2 (in eval mode) with seeded BN statistics."""
  batches = base.uniform_batches(INPUT_SHAPE, seed=seed + 100)
  model = base.init_nnx(lambda rngs: MobileNetV2NNX(rngs=rngs), seed)
  base.randomize_batchnorm_nnx(model, seed + 1)
  model.eval()
  return base.ZooModel("mobilenet_v2/nnx", model, None,
                       base.example_from(batches), batches, "nnx")
