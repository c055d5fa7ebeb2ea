"""A tiny message-passing graph network on fixed-size graphs: node features
[B, 10, 8] (float32) and an edge list of senders / receivers [B, 24]
(int32 node indices, one graph per row). A dense node encoder, two
message-passing steps (message = Dense of the gathered sender features,
aggregated per receiver with ``jax.ops.segment_sum(..., num_segments=10)``,
node update MLP on [node, aggregate], residual), mean readout over nodes,
dense graph classifier. Gather and segment sum are written per graph and
batched with ``jax.vmap``. Linen and NNX versions of one architecture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from qlite.zoo import base

NUM_NODES = 10
NUM_EDGES = 24
NODE_FEATURES = 8
HIDDEN = 16
STEPS = 2
NUM_CLASSES = 3


def graph_batches(*, seed: int, num: int = base.NUM_BATCHES,
                  batch_size: int = base.BATCH_SIZE) -> list:
  """``num`` seeded ``(nodes, senders, receivers)`` batches: standard-normal
  float32 node features and random int32 edge endpoints in [0, NUM_NODES)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    nodes = rng.standard_normal(
        (batch_size, NUM_NODES, NODE_FEATURES)).astype(np.float32)
    senders = rng.integers(0, NUM_NODES, (batch_size, NUM_EDGES))
    receivers = rng.integers(0, NUM_NODES, (batch_size, NUM_EDGES))
    out.append((nodes, senders.astype(np.int32), receivers.astype(np.int32)))
  return out


def gather_nodes(h, idx):
  """``h[b, idx[b]]`` for [B, N, F] node features and [B, E] indices."""
  return jax.vmap(lambda hb, ib: hb[ib])(h, idx)


def aggregate(messages, receivers):
  """Per-graph ``segment_sum`` of [B, E, F] messages onto [B, N, F]."""
  return jax.vmap(lambda mb, rb: jax.ops.segment_sum(
      mb, rb, num_segments=NUM_NODES))(messages, receivers)


class MessageStep(nn.Module):
  """One message-passing step with a residual node update (Linen)."""

  @nn.compact
  def __call__(self, h, senders, receivers):
    m = nn.relu(nn.Dense(HIDDEN, name="message")(gather_nodes(h, senders)))
    agg = aggregate(m, receivers)
    u = nn.relu(nn.Dense(HIDDEN, name="update1")(
        jnp.concatenate([h, agg], axis=-1)))
    return h + nn.Dense(HIDDEN, name="update2")(u)


class GraphNet(nn.Module):
  """Message-passing graph classifier (Linen)."""

  @nn.compact
  def __call__(self, nodes, senders, receivers):
    h = nn.relu(nn.Dense(HIDDEN, name="encoder")(nodes))
    for i in range(STEPS):
      h = MessageStep(name=f"step{i}")(h, senders, receivers)
    return nn.Dense(NUM_CLASSES, name="readout")(jnp.mean(h, axis=1))


class MessageStepNNX(nnx.Module):
  """One message-passing step with a residual node update (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.message = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
    self.update1 = nnx.Linear(2 * HIDDEN, HIDDEN, rngs=rngs)
    self.update2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)

  def __call__(self, h, senders, receivers):
    m = nnx.relu(self.message(gather_nodes(h, senders)))
    agg = aggregate(m, receivers)
    u = nnx.relu(self.update1(jnp.concatenate([h, agg], axis=-1)))
    return h + self.update2(u)


class GraphNetNNX(nnx.Module):
  """Message-passing graph classifier (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.encoder = nnx.Linear(NODE_FEATURES, HIDDEN, rngs=rngs)
    self.steps = nnx.List([MessageStepNNX(rngs=rngs) for _ in range(STEPS)])
    self.readout = nnx.Linear(HIDDEN, NUM_CLASSES, rngs=rngs)

  def __call__(self, nodes, senders, receivers):
    h = nnx.relu(self.encoder(nodes))
    for step in self.steps:
      h = step(h, senders, receivers)
    return self.readout(jnp.mean(h, axis=1))


def _example(batches: list) -> tuple:
  return tuple(np.ascontiguousarray(a[:1]) for a in batches[0])


def build_linen(seed: int = 0) -> base.ZooModel:
  """Returns the Linen graph network with seeded weights."""
  batches = graph_batches(seed=seed + 1100)
  model = GraphNet()
  variables = base.init_linen(model, seed, *_example(batches))
  return base.ZooModel("graph_net/linen", model, variables,
                       _example(batches), batches, "linen")


def build_nnx(seed: int = 0) -> base.ZooModel:
  """Returns the NNX graph network with seeded weights."""
  batches = graph_batches(seed=seed + 1100)
  model = base.init_nnx(lambda rngs: GraphNetNNX(rngs=rngs), seed)
  return base.ZooModel("graph_net/nnx", model, None,
                       _example(batches), batches, "nnx")
