"""graph.trace reuses a trace only for an equal model at equal shapes."""

import jax
import numpy as np
from flax import linen as nn
from flax import nnx

from qlite import graph as graph_lib
from qlite.flax_hooks import model_function


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
