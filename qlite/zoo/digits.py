"""A small CNN trained on scikit-learn's digits (real 8x8 images, shipped
with scikit-learn: no download). Linen and NNX versions of one architecture."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from qlite.errors import QliteError


@dataclasses.dataclass
class DigitsData:
  x_train: np.ndarray   # (N, 8, 8, 1) float32 in [0, 1]
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  def batches(self, batch_size: int, num: int | None = None, split="train"):
    """Returns a list of (batch_size, 8, 8, 1) calibration batches."""
    x = self.x_train if split == "train" else self.x_test
    n = len(x) // batch_size
    if num is not None:
      n = min(n, num)
    return [x[i * batch_size:(i + 1) * batch_size] for i in range(n)]


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
  """Returns the digits data set split into train / test (seeded)."""
  try:
    from sklearn import datasets
  except ImportError:
    raise QliteError("the digits example needs scikit-learn: pip install "
                     "'qlite[examples]'") from None
  d = datasets.load_digits()
  x = (d.images.astype(np.float32) / 16.0)[..., None]
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  x, y = x[perm], y[perm]
  n_test = int(len(x) * test_fraction)
  return DigitsData(x[n_test:], y[n_test:], x[:n_test], y[:n_test])


class DigitsCNN(nn.Module):
  """conv-relu, conv-relu, max-pool, dense-relu, dense (Linen)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


class DigitsCNNNNX(nnx.Module):
  """The same architecture in Flax NNX."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.fc1 = nnx.Linear(4 * 4 * 32, 64, rngs=rngs)
    self.fc2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.fc1(x))
    return self.fc2(x)


def linen_to_nnx(variables, rngs_seed: int = 0) -> DigitsCNNNNX:
  """Returns an NNX DigitsCNN holding the Linen model's weights."""
  p = variables["params"]
  m = DigitsCNNNNX(nnx.Rngs(rngs_seed))
  for dst, src in ((m.conv1, "Conv_0"), (m.conv2, "Conv_1"),
                   (m.fc1, "Dense_0"), (m.fc2, "Dense_1")):
    dst.kernel[...] = jnp.asarray(p[src]["kernel"])
    dst.bias[...] = jnp.asarray(p[src]["bias"])
  return m


def train(data: DigitsData, *, steps: int = 300, seed: int = 0,
          learning_rate: float = 3e-3, batch_size: int = 128):
  """Trains the Linen DigitsCNN with Adam; returns ``(model, variables)``."""
  try:
    import optax
  except ImportError:
    raise QliteError("training needs optax: pip install 'qlite[examples]'") \
        from None
  model = DigitsCNN()
  variables = model.init(jax.random.key(seed), data.x_train[:1])
  tx = optax.adam(learning_rate)
  opt = tx.init(variables)

  @jax.jit
  def step(v, opt, x, y):
    def loss(v):
      logits = model.apply(v, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    g = jax.grad(loss)(v)
    upd, opt = tx.update(g, opt, v)
    return optax.apply_updates(v, upd), opt

  rng = np.random.default_rng(seed)
  n = len(data.x_train)
  for _ in range(steps):
    idx = rng.integers(0, n, batch_size)
    variables, opt = step(variables, opt, data.x_train[idx], data.y_train[idx])
  return model, variables


def accuracy(logits, labels) -> float:
  """Top-1 accuracy in percent."""
  return float(np.mean(np.argmax(np.asarray(logits), -1) == labels) * 100.0)
