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
  """Base class of quantization providers (calibration, conversion, PTQ, QAT).

  A provider turns a traced :class:`qlite.trace.graph.Graph` into outputs,
  given flat params and flat args; :class:`QuantizedModel` does the
  tracing (once per input signature), calls :meth:`prepare` on each new
  graph and :meth:`run` on every call. The built-in providers are
  ``qlite.annotate.CalibrationProvider``,
  ``qlite.annotate.ConversionProvider``, ``qlite.xla.PtqProvider`` and
  ``qlite.QatProvider``; a new backend subclasses this class.

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> from qlite.trace import graph as graph_lib
    >>> class Float(qlite.Provider):          # runs the graph unchanged
    ...   def run(self, qmodel, graph, state, flat_params, flat_args):
    ...     return graph_lib.evaluate(graph, flat_params, flat_args)
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> qm = qlite.quantize_model(model, Float(), x, variables=variables)
    >>> qm.apply(variables, x).shape
    (1, 4)
  """

  def prepare(self, graph: graph_lib.Graph) -> Any:
    """Returns per-graph state (e.g. a plan), computed once per input shape.

    Args:
      graph: the traced model.

    Returns:
      Anything; :meth:`run` gets it as ``state``. The base class returns
      None.
    """
    return None

  def run(self, qmodel: "QuantizedModel", graph: graph_lib.Graph, state: Any,
          flat_params: list, flat_args: list) -> list:
    """Returns the flat outputs of the graph run under this provider.

    Args:
      qmodel: the :class:`QuantizedModel` being called.
      graph: the traced model.
      state: what :meth:`prepare` returned for ``graph``.
      flat_params: the params, flattened (may hold ``QArray`` leaves:
        pre-quantized weights).
      flat_args: the call's positional args, flattened.

    Returns:
      The list of outputs, flattened (``graph.out_tree`` order).
    """
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
  """A Flax model whose ops run under a provider (see :func:`quantize_model`).

  Linen: ``qmodel.apply(variables, *args)``. NNX: ``qmodel(*args)`` (the NNX
  module's current state is used). Graphs are traced once per input
  signature (shapes, dtypes, tree structure) and cached.

  Args:
    model: a ``flax.linen.Module`` or ``flax.nnx.Module``.
    provider: the :class:`Provider` that runs the traced graph.
    variables: the Linen variables (needed for ``qmodel(*args)``); None for
      NNX.

  Attributes:
    model: the wrapped model.
    provider: the provider.

  Raises:
    QliteError: ``provider`` is not a qlite :class:`Provider`; ``model`` is
      not a Flax module; an NNX model with ``variables``.

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> rules = [qlite.QuantizationRule()]
    >>> provider = qlite.annotate.CalibrationProvider(rules)
    >>> qm = qlite.QuantizedModel(model, provider, variables)
    >>> qm.apply(variables, x).shape
    (1, 4)
    >>> qm(x).shape                       # the variables given at wrap
    (1, 4)
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
    """Runs the model under the provider (the Linen-style call).

    Args:
      variables: the Linen variables to run with.
      *args: the model's positional args.

    Returns:
      The model's outputs (the tree ``model.apply`` returns).

    Raises:
      QliteError: an NNX model (call ``qmodel(*args)``); ``variables`` with
        another number of arrays than the model traced with; tracing
        failed. The provider's errors pass through (e.g.
        ``CalibrationError`` for a boundary without statistics).
    """
    if self.mf.framework == "nnx":
      raise QliteError("this is an NNX model: call qmodel(*args)")
    return self._run(variables, args)

  def __call__(self, *args):
    """Runs the model under the provider with its own variables.

    NNX: the module's current state; Linen: the ``variables`` given when
    wrapping.

    Args:
      *args: the model's positional args.

    Returns:
      The model's outputs.

    Raises:
      QliteError: a Linen model wrapped without variables (use
        :meth:`apply`), or tracing failed.
    """
    if self.mf.params is None:
      raise QliteError(f"{self.mf.description}: Linen model wrapped without "
                       f"variables: use qmodel.apply(variables, *args)")
    return self._run(self.mf.params, args)


def quantize_model(model, provider: Provider, *example_args,
                   variables=None) -> QuantizedModel:
  """Wraps an unmodified Flax model so that ``provider`` runs its ops.

  The Qwix-style entry point: the same model runs calibration, the
  fake-quant model of the LiteRT export, XLA PTQ or QAT, depending on the
  provider.

  Args:
    model: a ``flax.linen.Module`` or ``flax.nnx.Module``.
    provider: a :class:`Provider`, e.g.
      ``qlite.annotate.CalibrationProvider(rules)``,
      ``qlite.annotate.ConversionProvider(rules, stats)`` or
      ``qlite.QatProvider(rules)``.
    *example_args: optional example inputs: the model is traced on them now
      (and the provider plans it), so errors show up here rather than at
      the first call. Ignored for ``QatProvider``.
    variables: the Linen variables (needed with ``example_args``); None for
      NNX.

  Returns:
    A :class:`QuantizedModel`; for a ``QatProvider``, a
    :class:`qlite.QatModel`.

  Raises:
    QliteError: ``provider`` is not a qlite provider; ``model`` is not a
      Flax module; ``example_args`` given for a Linen model without
      ``variables``; tracing failed. With ``example_args``, the provider's
      planning errors too (``ConversionProvider``: ``CalibrationError`` for
      a boundary without statistics, ``QTypeError`` for a qtype LiteRT
      cannot run).

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> rules = [qlite.QuantizationRule()]
    >>> calib = qlite.annotate.CalibrationProvider(rules)
    >>> qm = qlite.quantize_model(model, calib, x, variables=variables)
    >>> for batch in (x, -x):
    ...   _ = qm.apply(variables, batch)
    >>> fq = qlite.quantize_model(
    ...     model, qlite.annotate.ConversionProvider(rules, calib.stats), x,
    ...     variables=variables)
    >>> fq.apply(variables, x).shape      # the fake-quant model
    (1, 4)
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
