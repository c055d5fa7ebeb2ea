"""Shared pieces of the model zoo: the ``ZooModel`` record and seeded helpers
for calibration data and non-trivial BatchNorm statistics."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NUM_BATCHES = 8
BATCH_SIZE = 4


@dataclasses.dataclass
class ZooModel:
  """One ready-to-quantize zoo model.

  Attributes:
    name: registry name, e.g. ``"mobilenet_v2/linen"``.
    model: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
    variables: the Linen variables dict, or ``None`` for NNX.
    example_args: batch-1 example inputs (float32 numpy arrays).
    batches: >= 8 seeded calibration batches (numpy arrays or tuples).
    framework: ``"linen"`` or ``"nnx"``.
  """
  name: str
  model: Any
  variables: Any
  example_args: tuple
  batches: list
  framework: str

  def apply(self, *args):
    """Runs the float model on positional ``args``; returns its output."""
    if self.framework == "linen":
      return self.model.apply(self.variables, *args)
    return self.model(*args)

  def param_count(self) -> int:
    """Number of trainable parameters (BatchNorm statistics excluded)."""
    if self.framework == "linen":
      params = self.variables["params"]
    else:
      params = nnx.state(self.model, nnx.Param)
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def uniform_batches(shape, *, seed: int, num: int = NUM_BATCHES,
                    batch_size: int = BATCH_SIZE, low: float = 0.0,
                    high: float = 1.0) -> list:
  """Returns ``num`` seeded float32 batches of ``(batch_size, *shape)``
  drawn uniformly from ``[low, high)`` (e.g. images in [0, 1])."""
  rng = np.random.default_rng(seed)
  return [rng.uniform(low, high, (batch_size, *shape)).astype(np.float32)
          for _ in range(num)]


def normal_batches(shape, *, seed: int, num: int = NUM_BATCHES,
                   batch_size: int = BATCH_SIZE) -> list:
  """Returns ``num`` seeded standard-normal float32 batches of
  ``(batch_size, *shape)`` (e.g. token embeddings, sensor features)."""
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((batch_size, *shape)).astype(np.float32)
          for _ in range(num)]


def example_from(batches: list) -> tuple:
  """Returns the batch-1 example args: the first row of the first batch."""
  return (np.ascontiguousarray(batches[0][:1]),)


def _key_names(path) -> list:
  """The string / int names along a pytree key path (``.value`` dropped)."""
  out = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
    if name != "value":
      out.append(str(name))
  return out


def _fan_in(names: list, shape: tuple) -> int:
  """Fan-in of a kernel; 3-D attention kernels ([in, heads, head_dim] for
  query / key / value, [heads, head_dim, out] for out) are special-cased."""
  if len(shape) == 3 and len(names) >= 2 and names[-2] in (
      "query", "key", "value"):
    return int(shape[0])
  return max(1, int(np.prod(shape[:-1])))


def _host_value(rng: np.random.Generator, names: list, leaf) -> np.ndarray:
  """A seeded host-side value for one abstract parameter / statistic."""
  shape, name = tuple(leaf.shape), names[-1] if names else ""
  if name == "kernel":
    v = rng.standard_normal(shape) / np.sqrt(_fan_in(names, shape))
  elif name == "bias":
    v = rng.normal(0.0, 0.02, shape)
  elif name == "scale":
    v = rng.uniform(0.8, 1.2, shape)
  elif name == "mean":
    v = np.zeros(shape)
  elif name == "var":
    v = np.ones(shape)
  else:                                   # embeddings and other params
    v = rng.normal(0.0, 0.02, shape)
  return np.asarray(v, dtype=leaf.dtype)


def _fill(abstract, seed: int):
  """Replaces every ``ShapeDtypeStruct`` leaf of ``abstract`` by a seeded
  numpy value chosen from the leaf's name (kernel, bias, scale, ...)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(_host_value(rng, _key_names(path), leaf)),
      abstract)


def init_linen(model, seed: int, *args) -> dict:
  """Seeded Linen variables for ``model`` on example ``args``, generated on
  the host (``jax.eval_shape`` gives the shapes: no per-shape XLA compiles
  of the Flax initializers, which dominate build time on small CPUs)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), *args)
  return _fill(abstract, seed)


def init_nnx(make: Callable[[nnx.Rngs], nnx.Module], seed: int) -> nnx.Module:
  """Returns ``make(rngs)`` with all its state replaced by seeded host-side
  values (built abstractly with ``nnx.eval_shape``, as for ``init_linen``)."""
  abstract = nnx.eval_shape(lambda: make(nnx.Rngs(seed)))
  graphdef, state = nnx.split(abstract)
  for leaf in jax.tree_util.tree_leaves(state):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      raise TypeError("init_nnx: models holding RNG state are not supported")
  return nnx.merge(graphdef, _fill(state, seed))


def _bn_values(rng: np.random.Generator, n: int) -> dict:
  """Seeded non-trivial BatchNorm mean / var / scale / bias of width ``n``."""
  return {
      "mean": rng.normal(0.0, 0.2, n).astype(np.float32),
      "var": rng.uniform(0.5, 2.0, n).astype(np.float32),
      "scale": rng.uniform(0.6, 1.4, n).astype(np.float32),
      "bias": rng.normal(0.0, 0.1, n).astype(np.float32),
  }


def randomize_batchnorm_linen(variables: dict, seed: int) -> dict:
  """Returns Linen ``variables`` with every BatchNorm's running statistics and
  affine params set to seeded non-trivial values (so BN folding matters)."""
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(lambda x: x, dict(variables["params"]))
  stats = jax.tree_util.tree_map(lambda x: x, dict(variables["batch_stats"]))

  def visit(p, s):
    for key in sorted(s):
      if "mean" in s[key] and "var" in s[key]:
        v = _bn_values(rng, s[key]["mean"].shape[-1])
        s[key] = {"mean": jnp.asarray(v["mean"]), "var": jnp.asarray(v["var"])}
        p[key] = {"scale": jnp.asarray(v["scale"]),
                  "bias": jnp.asarray(v["bias"])}
      else:
        p[key], s[key] = dict(p[key]), dict(s[key])
        visit(p[key], s[key])

  visit(params, stats)
  out = dict(variables)
  out["params"], out["batch_stats"] = params, stats
  return out


def randomize_batchnorm_nnx(model: nnx.Module, seed: int) -> nnx.Module:
  """Sets every ``nnx.BatchNorm`` in ``model`` (in path order) to seeded
  non-trivial statistics / affine params, in place; returns ``model``."""
  rng = np.random.default_rng(seed)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.BatchNorm):
      v = _bn_values(rng, m.mean.shape[-1])
      for k in ("mean", "var", "scale", "bias"):
        getattr(m, k)[...] = jnp.asarray(v[k])
  return model
