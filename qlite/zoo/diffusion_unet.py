"""A tiny diffusion-style UNet: a noisy image [B, 16, 16, 3] and an int32
timestep t [B] in [0, 1000) (DDPM's discrete steps) -> a noise estimate
[B, 16, 16, 3]. The timestep goes through a sinusoidal embedding (``sin`` /
``cos`` of ``10 t / 1000`` times 8 frequencies from 1 down to 1/100; t is
clipped to the schedule first, as indexing a noise schedule by t would) and
a two-layer SiLU MLP. In the int8 model the embedding is a lookup table of
the 1000 steps (``qlite.ops.int_lookup``: GATHER, no SIN / COS); every residual
block (GroupNorm, SiLU, 3x3 conv, plus a dense projection of the time
embedding broadcast over H and W, GroupNorm, SiLU, 3x3 conv, residual) adds
it to its features. One level down (stride-2 conv, 16 -> 8), a residual
block and a self-attention block (GroupNorm, Flax multi-head attention over
the 64 positions, residual) at 8x8, nearest 2x ``jax.image.resize`` up,
skip concatenation, a residual block, GroupNorm, SiLU, output conv. Linen
and NNX versions of one architecture."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from qlite.zoo import base

INPUT_SHAPE = (16, 16, 3)
C1, C2 = 16, 32
GROUPS = 4
NUM_HEADS = 2
TIME_FREQS = 8            # sin + cos -> a 16-wide embedding
TIME_SCALE = 10.0
MAX_PERIOD = 100.0
NUM_TIMESTEPS = 1000
TEMB = 32


def timestep_embedding(t):
  """Sinusoidal embedding [B, 2 * TIME_FREQS] of int timesteps [B] in
  [0, NUM_TIMESTEPS)."""
  t = jnp.clip(t, 0, NUM_TIMESTEPS - 1)
  freqs = jnp.exp(-math.log(MAX_PERIOD) *
                  jnp.arange(TIME_FREQS, dtype=jnp.float32) / TIME_FREQS)
  args = t[:, None] * (TIME_SCALE / NUM_TIMESTEPS * freqs)[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def upsample2x(x):
  """Nearest-neighbour 2x upsampling of an NHWC tensor."""
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")


def diffusion_batches(*, seed: int, num: int = base.NUM_BATCHES,
                      batch_size: int = base.BATCH_SIZE) -> list:
  """``num`` seeded ``(x, t)`` batches: standard-normal noisy images and
  uniform int32 timesteps in [0, NUM_TIMESTEPS)."""
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal((batch_size, *INPUT_SHAPE)).astype(np.float32),
           rng.integers(0, NUM_TIMESTEPS, (batch_size,)).astype(np.int32))
          for _ in range(num)]


class ResBlock(nn.Module):
  """GroupNorm / SiLU / conv residual block with a time-embedding add
  (Linen)."""
  features: int

  @nn.compact
  def __call__(self, x, temb):
    h = nn.Conv(self.features, (3, 3), name="conv1")(
        nn.silu(nn.GroupNorm(GROUPS, name="norm1")(x)))
    h = h + nn.Dense(self.features, name="time")(nn.silu(temb))[:, None,
                                                                 None, :]
    h = nn.Conv(self.features, (3, 3), name="conv2")(
        nn.silu(nn.GroupNorm(GROUPS, name="norm2")(h)))
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), name="skip")(x)
    return x + h


class AttnBlock(nn.Module):
  """GroupNorm + multi-head self-attention over H*W positions (Linen)."""

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = nn.GroupNorm(GROUPS, name="norm")(x).reshape(b, h * w, c)
    y = nn.MultiHeadDotProductAttention(num_heads=NUM_HEADS, qkv_features=c,
                                        deterministic=True, name="attn")(y, y)
    return x + y.reshape(b, h, w, c)


class DiffusionUNet(nn.Module):
  """Tiny diffusion UNet (Linen): (x [B, H, W, 3], t [B]) -> [B, H, W, 3]."""

  @nn.compact
  def __call__(self, x, t):
    temb = nn.Dense(TEMB, name="time1")(timestep_embedding(t))
    temb = nn.Dense(TEMB, name="time2")(nn.silu(temb))
    h1 = nn.Conv(C1, (3, 3), name="conv_in")(x)                     # 16x16
    h1 = ResBlock(C1, name="down_block")(h1, temb)
    h2 = nn.Conv(C2, (3, 3), strides=(2, 2), name="downsample")(h1)  # 8x8
    h2 = ResBlock(C2, name="mid_block")(h2, temb)
    h2 = AttnBlock(name="mid_attn")(h2)
    y = jnp.concatenate([upsample2x(h2), h1], axis=-1)               # 16x16
    y = ResBlock(C1, name="up_block")(y, temb)
    y = nn.silu(nn.GroupNorm(GROUPS, name="norm_out")(y))
    return nn.Conv(INPUT_SHAPE[-1], (3, 3), name="conv_out")(y)


class ResBlockNNX(nnx.Module):
  """GroupNorm / SiLU / conv residual block with a time-embedding add
  (NNX)."""

  def __init__(self, in_features: int, features: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.GroupNorm(in_features, num_groups=GROUPS, rngs=rngs)
    self.conv1 = nnx.Conv(in_features, features, (3, 3), rngs=rngs)
    self.time = nnx.Linear(TEMB, features, rngs=rngs)
    self.norm2 = nnx.GroupNorm(features, num_groups=GROUPS, rngs=rngs)
    self.conv2 = nnx.Conv(features, features, (3, 3), rngs=rngs)
    self.skip = (nnx.Conv(in_features, features, (1, 1), rngs=rngs)
                 if in_features != features else None)

  def __call__(self, x, temb):
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = h + self.time(nnx.silu(temb))[:, None, None, :]
    h = self.conv2(nnx.silu(self.norm2(h)))
    if self.skip is not None:
      x = self.skip(x)
    return x + h


class AttnBlockNNX(nnx.Module):
  """GroupNorm + multi-head self-attention over H*W positions (NNX)."""

  def __init__(self, features: int, *, rngs: nnx.Rngs):
    self.norm = nnx.GroupNorm(features, num_groups=GROUPS, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(NUM_HEADS, features,
                                       qkv_features=features, decode=False,
                                       deterministic=True, rngs=rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    y = self.norm(x).reshape(b, h * w, c)
    return x + self.attn(y).reshape(b, h, w, c)


class DiffusionUNetNNX(nnx.Module):
  """Tiny diffusion UNet (NNX): (x [B, H, W, 3], t [B]) -> [B, H, W, 3]."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.time1 = nnx.Linear(2 * TIME_FREQS, TEMB, rngs=rngs)
    self.time2 = nnx.Linear(TEMB, TEMB, rngs=rngs)
    self.conv_in = nnx.Conv(INPUT_SHAPE[-1], C1, (3, 3), rngs=rngs)
    self.down_block = ResBlockNNX(C1, C1, rngs=rngs)
    self.downsample = nnx.Conv(C1, C2, (3, 3), strides=(2, 2), rngs=rngs)
    self.mid_block = ResBlockNNX(C2, C2, rngs=rngs)
    self.mid_attn = AttnBlockNNX(C2, rngs=rngs)
    self.up_block = ResBlockNNX(C2 + C1, C1, rngs=rngs)
    self.norm_out = nnx.GroupNorm(C1, num_groups=GROUPS, rngs=rngs)
    self.conv_out = nnx.Conv(C1, INPUT_SHAPE[-1], (3, 3), rngs=rngs)

  def __call__(self, x, t):
    temb = self.time2(nnx.silu(self.time1(timestep_embedding(t))))
    h1 = self.down_block(self.conv_in(x), temb)
    h2 = self.mid_attn(self.mid_block(self.downsample(h1), temb))
    y = jnp.concatenate([upsample2x(h2), h1], axis=-1)
    y = self.up_block(y, temb)
    return self.conv_out(nnx.silu(self.norm_out(y)))


def _example(batches: list) -> tuple:
  return tuple(np.ascontiguousarray(a[:1]) for a in batches[0])


def build_linen(seed: int = 0) -> base.ZooModel:
  """Returns the Linen diffusion UNet with seeded weights."""
  batches = diffusion_batches(seed=seed + 1200)
  model = DiffusionUNet()
  variables = base.init_linen(model, seed, *_example(batches))
  return base.ZooModel("diffusion_unet/linen", model, variables,
                       _example(batches), batches, "linen")


def build_nnx(seed: int = 0) -> base.ZooModel:
  """Returns the NNX diffusion UNet with seeded weights."""
  batches = diffusion_batches(seed=seed + 1200)
  model = base.init_nnx(lambda rngs: DiffusionUNetNNX(rngs=rngs), seed)
  return base.ZooModel("diffusion_unet/nnx", model, None,
                       _example(batches), batches, "nnx")
