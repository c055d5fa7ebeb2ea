"""graph.trace reuses a trace only for an equal model at equal shapes."""

import jax
import numpy as np
from flax import linen as nn
from flax import nnx

from qlite.trace import graph as graph_lib
from qlite.trace.flax_hooks import model_function


class Tiny(nn.Module):
  features: int = 4
  act: str = "relu"

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.features)(x)
    return nn.relu(y) if self.act == "relu" else nn.tanh(y)


def _prims(g):
  return [n.prim.name for n in g.nodes]


def test_linen_equal_config_reuses_trace_other_config_does_not():
  x = np.ones((2, 3), np.float32)
  v = Tiny().init(jax.random.key(0), x)
  g1 = graph_lib.trace(model_function(Tiny(), v), (x,))
  g2 = graph_lib.trace(model_function(Tiny(), v), (x,))
  assert g2 is g1
  g3 = graph_lib.trace(model_function(Tiny(act="tanh"), v), (x,))
  assert g3 is not g1 and "tanh" in _prims(g3) and "tanh" not in _prims(g1)
  g4 = graph_lib.trace(model_function(Tiny(), v), (np.ones((5, 3),
                                                           np.float32),))
  assert g4 is not g1 and g4.avals[g4.arg_vars[0]].shape == (5, 3)


class NnxTiny(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 4, rngs=rngs)
    self.act = nnx.relu

  def __call__(self, x):
    return self.act(self.dense(x))


def test_nnx_changed_module_is_traced_again():
  x = np.ones((2, 3), np.float32)
  m = NnxTiny(nnx.Rngs(0))
  g1 = graph_lib.trace(model_function(m), (x,))
  assert graph_lib.trace(model_function(m), (x,)) is g1
  m.act = nnx.tanh                                  # static attribute change
  g2 = graph_lib.trace(model_function(m), (x,))
  assert g2 is not g1 and "tanh" in _prims(g2)
  m.dense = nnx.Linear(3, 6, rngs=nnx.Rngs(1))      # a new layer shape
  g3 = graph_lib.trace(model_function(m), (x,))
  assert g3 is not g2 and g3.avals[g3.out_vars[0]].shape == (2, 6)


class Unhashable(nn.Module):
  sizes: list

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.sizes[0])(x)


def test_unhashable_module_is_traced_every_time():
  x = np.ones((1, 3), np.float32)
  m = Unhashable(sizes=[2])
  v = m.init(jax.random.key(0), x)
  mf = model_function(m, v)
  assert mf.cache_key is None
  assert graph_lib.trace(mf, (x,)) is not graph_lib.trace(mf, (x,))


class Folded(nn.Module):
  """A param-only chain (BatchNorm-style scale folded into the kernel)."""

  @nn.compact
  def __call__(self, x):
    k = self.param("k", nn.initializers.normal(), (3, 4))
    g = self.param("g", nn.initializers.ones, (4,))
    return x @ (k * (g / np.sqrt(2.0)))


def _folded_values(variables, batch):
  x = np.ones((batch, 3), np.float32)
  g = graph_lib.trace(model_function(Folded(), variables), (x,))
  flat = jax.tree_util.tree_leaves(variables)
  return graph_lib.fold_static(g, flat)


def test_fold_static_shares_the_compile_across_batch_sizes():
  graph_lib._FOLD_CACHE.clear()
  v = Folded().init(jax.random.key(0), np.ones((1, 3), np.float32))
  f1 = _folded_values(v, 8)
  assert len(graph_lib._FOLD_CACHE) == 1
  fn = next(iter(graph_lib._FOLD_CACHE.values()))
  f2 = _folded_values(v, 1)                 # other shapes: same static part
  assert len(graph_lib._FOLD_CACHE) == 1
  assert next(iter(graph_lib._FOLD_CACHE.values())) is fn
  assert f1.keys() == f2.keys()
  for key in f1:
    np.testing.assert_array_equal(f1[key], f2[key])
  want = np.asarray(v["params"]["k"]) * (np.asarray(v["params"]["g"])
                                         / np.sqrt(2.0))
  (prod,) = [key for key in f1 if f1[key].shape == (3, 4)
             and np.allclose(f1[key], want, rtol=1e-6)
             and not np.allclose(f1[key], v["params"]["k"])]
  # the shared compile still reads the params it is given
  v2 = jax.tree_util.tree_map(lambda a: a * 3.0, v)
  f3 = _folded_values(v2, 1)
  assert len(graph_lib._FOLD_CACHE) == 1
  np.testing.assert_allclose(f3[prod], 9.0 * want, rtol=1e-5)
