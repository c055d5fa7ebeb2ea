"""``quantize_model``: wrap an unmodified Flax model so a provider sees and
rewrites every op it runs."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from qlite.trace import graph as graph_lib
from qlite.core.qarray import is_qarray
from qlite.errors import QliteError
from qlite.trace.flax_hooks import ModelFunction, model_function


class Provider:
  """Base class of quantization providers (calibration, conversion, PTQ).

  A provider turns a traced :class:`qlite.trace.graph.Graph` into outputs, given
  flat params and flat args; :class:`QuantizedModel` does the tracing.
  """

  def prepare(self, graph: graph_lib.Graph) -> Any:
    """Returns per-graph state (e.g. a plan), computed once per input shape."""
    return None

  def run(self, qmodel: "QuantizedModel", graph: graph_lib.Graph, state: Any,
          flat_params: list, flat_args: list) -> list:
    """Returns the flat outputs of the graph run under this provider."""
    raise NotImplementedError


def _float_stand_ins(params):
  """``params`` with each QArray replaced by a float array of its shape."""
  return jax.tree.map(
      lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape)
      if is_qarray(x) else x, params, is_leaf=is_qarray)


def _signature(flat_args) -> tuple:
  return tuple((tuple(np.shape(a)), str(np.asarray(a).dtype)
                if not hasattr(a, "dtype") else str(a.dtype)) for a in flat_args)


class QuantizedModel:
  """A Flax model whose ops run under a provider.

  Linen: ``qmodel.apply(variables, *args)``. NNX: ``qmodel(*args)`` (the NNX
  module's current state is used). Graphs are traced once per input signature.
  """

  def __init__(self, model, provider: Provider, variables=None):
    if not isinstance(provider, Provider):
      raise QliteError(f"provider must be a qlite provider (e.g. qlite.annotate"
                       f".CalibrationProvider), got {type(provider).__name__}")
    self.model = model
    self.provider = provider
    self.mf: ModelFunction = model_function(model, variables,
                                            require_variables=False)
    self._cache: dict = {}

  def traced(self, args, params=None):
    """Returns ``(graph, provider_state)`` for these args (cached)."""
    flat_args = jax.tree.leaves(tuple(args))
    key = (_signature(flat_args), jax.tree.structure(tuple(args)))
    if key not in self._cache:
      mf = self.mf if params is None else ModelFunction(
          self.mf.fn, params, self.mf.framework, self.mf.root_name,
          self.mf.description)
      g = graph_lib.trace(mf, args)
      self._cache[key] = (g, self.provider.prepare(g))
    return self._cache[key]

  def _run(self, params, args):
    # Params may hold QArray leaves (qlite.xla.quantize_params): trace with
    # float stand-ins, hand the QArrays themselves to the provider.
    g, state = self.traced(args, _float_stand_ins(params))
    flat_params = jax.tree.leaves(params, is_leaf=is_qarray)
    if len(flat_params) != len(g.param_vars):
      raise QliteError(f"{self.mf.description}: the variables have "
                       f"{len(flat_params)} arrays, the model traced with "
                       f"{len(g.param_vars)}; pass the same (possibly "
                       f"quantized) variables")
    outs = self.provider.run(self, g, state, flat_params,
                             jax.tree.leaves(tuple(args)))
    return jax.tree.unflatten(g.out_tree, outs)

  def apply(self, variables, *args):
    """Linen-style call: returns the model's outputs for ``args``."""
    if self.mf.framework == "nnx":
      raise QliteError("this is an NNX model: call qmodel(*args)")
    return self._run(variables, args)

  def __call__(self, *args):
    """Call with the model's own variables (NNX, or Linen given at wrap)."""
    if self.mf.params is None:
      raise QliteError(f"{self.mf.description}: Linen model wrapped without "
                       f"variables: use qmodel.apply(variables, *args)")
    return self._run(self.mf.params, args)


def quantize_model(model, provider: Provider, *example_args,
                   variables=None) -> QuantizedModel:
  """Returns ``model`` wrapped so ``provider`` runs its ops.

  ``example_args`` (optional) trace the model now, so errors show up here.
  Raises:
    QliteError: the model is not a Flax module, or tracing it failed.
  """
  if hasattr(provider, "wrap_model"):    # e.g. QatProvider: init / apply
    return provider.wrap_model(model, variables)
  qm = QuantizedModel(model, provider, variables)
  if example_args:
    if qm.mf.params is None:
      raise QliteError(f"{qm.mf.description} is a Linen module: pass "
                       f"variables=... to trace it on the example args")
    qm.traced(example_args)
  return qm
