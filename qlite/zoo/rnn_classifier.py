"""A tiny recurrent text classifier over int32 token ids [B, 12]: ``Embed``,
a bidirectional LSTM (``Bidirectional`` of ``RNN(LSTMCell)`` forward and
backward, outputs concatenated), mean over time, dense classifier. Linen and
NNX versions of one architecture (no GRU layer: Flax's Linen and NNX
``GRUCell`` differ -- Linen has six dense layers and a bias on the hidden
``n`` projection, NNX two fused ones (input, hidden) and no hidden bias --
so the two versions would not share one architecture). The NNX RNNs are
built with ``rngs=False`` and given an explicit zero initial carry (an
``nnx.RNN`` holding an ``RngStream`` for its carry initializer is state
the zoo's seeded initializer does not fill)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from qlite.zoo import base

VOCAB = 48
SEQ_LEN = 12
EMBED_DIM = 16
HIDDEN = 16
NUM_CLASSES = 4


def token_batches(*, seed: int, num: int = base.NUM_BATCHES,
                  batch_size: int = base.BATCH_SIZE) -> list:
  """``num`` seeded int32 token-id batches of ``(batch_size, SEQ_LEN)``."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, (batch_size, SEQ_LEN)).astype(np.int32)
          for _ in range(num)]


class RNNClassifier(nn.Module):
  """BiLSTM text classifier (Linen)."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, EMBED_DIM, name="embed")(ids)
    x = nn.Bidirectional(nn.RNN(nn.LSTMCell(HIDDEN), name="lstm_fwd"),
                         nn.RNN(nn.LSTMCell(HIDDEN), name="lstm_bwd"),
                         name="bilstm")(x)
    return nn.Dense(NUM_CLASSES, name="head")(jnp.mean(x, axis=1))


class RNNClassifierNNX(nnx.Module):
  """BiLSTM text classifier (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, EMBED_DIM, rngs=rngs)
    self.bilstm = nnx.Bidirectional(
        nnx.RNN(nnx.LSTMCell(EMBED_DIM, HIDDEN, rngs=rngs), rngs=False),
        nnx.RNN(nnx.LSTMCell(EMBED_DIM, HIDDEN, rngs=rngs), rngs=False),
        rngs=False)
    self.head = nnx.Linear(2 * HIDDEN, NUM_CLASSES, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    zeros = jnp.zeros((ids.shape[0], HIDDEN), jnp.float32)
    x = self.bilstm(x, initial_carry=((zeros, zeros), (zeros, zeros)))
    return self.head(jnp.mean(x, axis=1))


def unit_embedding(seed: int) -> np.ndarray:
  """Seeded standard-normal [VOCAB, EMBED_DIM] embedding table (Flax's
  default ``Embed`` init scale; the zoo's generic 0.02 would leave the
  un-normalized LSTM inputs, and so the logits' input dependence, tiny)."""
  rng = np.random.default_rng(seed)
  return rng.standard_normal((VOCAB, EMBED_DIM)).astype(np.float32)


def build_linen(seed: int = 0) -> base.ZooModel:
  """Returns the Linen RNN classifier with seeded weights."""
  batches = token_batches(seed=seed + 900)
  model = RNNClassifier()
  variables = base.init_linen(model, seed, batches[0][:1])
  params = dict(variables["params"])
  params["embed"] = {"embedding": jnp.asarray(unit_embedding(seed + 1))}
  variables = {**variables, "params": params}
  return base.ZooModel("rnn_classifier/linen", model, variables,
                       base.example_from(batches), batches, "linen")


def build_nnx(seed: int = 0) -> base.ZooModel:
  """Returns the NNX RNN classifier with seeded weights."""
  batches = token_batches(seed=seed + 900)
  model = base.init_nnx(lambda rngs: RNNClassifierNNX(rngs=rngs), seed)
  model.embed.embedding[...] = jnp.asarray(unit_embedding(seed + 1))
  return base.ZooModel("rnn_classifier/nnx", model, None,
                       base.example_from(batches), batches, "nnx")
