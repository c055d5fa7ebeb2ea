"""Zoo entries for the trained digits CNN of ``qlite.zoo.digits``: the Linen
model is trained for 150 steps; the NNX model holds the same weights (via
``digits.linen_to_nnx``). Calibration batches are real digits images."""

from __future__ import annotations

import functools

import jax
import numpy as np

from qlite.zoo import base
from qlite.zoo import digits

TRAIN_STEPS = 150
BATCH_SIZE = 8
NUM_BATCHES = 16


@functools.lru_cache(maxsize=None)
def _trained(seed: int):
  """Data and trained Linen variables (as numpy), cached per seed so the
  Linen and NNX entries train only once and share weights."""
  data = digits.load_digits(seed=seed)
  _, variables = digits.train(data, steps=TRAIN_STEPS, seed=seed)
  return data, jax.tree_util.tree_map(np.asarray, variables)


def clear_cache() -> None:
  """Forgets the cached training result (the next build retrains)."""
  _trained.cache_clear()


def _data_and_variables(seed: int):
  data, variables = _trained(seed)
  return data, jax.tree_util.tree_map(np.array, variables)  # private copy


def _batches_and_example(data: digits.DigitsData):
  batches = data.batches(BATCH_SIZE, NUM_BATCHES, split="train")
  return batches, (np.ascontiguousarray(data.x_test[:1]),)


def build_linen(seed: int = 0) -> base.ZooModel:
  """Returns the Linen DigitsCNN trained for 150 steps on real digits."""
  data, variables = _data_and_variables(seed)
  batches, example = _batches_and_example(data)
  return base.ZooModel("digits_cnn/linen", digits.DigitsCNN(), variables,
                       example, batches, "linen")


def build_nnx(seed: int = 0) -> base.ZooModel:
  """Returns the NNX DigitsCNN holding the Linen entry's trained weights."""
  data, variables = _data_and_variables(seed)
  batches, example = _batches_and_example(data)
  model = digits.linen_to_nnx(variables, rngs_seed=seed)
  return base.ZooModel("digits_cnn/nnx", model, None, example, batches, "nnx")
