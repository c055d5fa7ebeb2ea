"""Offline weight quantization: abstract quantized params, ``quantize_params``
(whole tree or any subtree, e.g. layer by layer while loading) and orbax
save / restore of the result."""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qlite.core import numerics
from qlite.core.qarray import QArray, is_qarray, quantize
from qlite.core.qtypes import get_qtype
from qlite.errors import QliteError
from qlite.rules import QuantizationRule
from qlite.xla.provider import PtqModel, PtqProvider

__all__ = ["abstract_quantized_params", "quantize_params", "save_qparams",
           "restore_qparams", "param_bytes"]

_INT4 = np.dtype(ml_dtypes.int4)


def _placeholder(shape, dtype, qtype, channel_axes, tile_sizes, method,
                 ) -> QArray:
  qt = get_qtype(qtype)
  tiles = dict(tile_sizes)
  sshape = tuple(d if i in channel_axes else
                 (d // tiles[i] if i in tiles else 1)
                 for i, d in enumerate(shape))
  has_zp = method == "minmax" and qt.is_int
  return QArray(
      qvalue=jax.ShapeDtypeStruct(tuple(shape), qt.storage_dtype),
      scale=jax.ShapeDtypeStruct(sshape, np.float32),
      zero_point=jax.ShapeDtypeStruct(sshape, np.int32) if has_zp else None,
      qtype=qt, channel_axes=tuple(channel_axes),
      tile_sizes=tuple(sorted(tiles.items())),
      dtype=numerics.float_dtype_or_f32(dtype))


def abstract_quantized_params(model, rules: Sequence[QuantizationRule],
                              *example_args, variables=None):
  """Returns the params tree with placeholder QArrays for the quantized weights.

  The tree of ``model``'s params (Linen ``variables`` / NNX state) with a
  placeholder :class:`QArray` (``jax.ShapeDtypeStruct`` leaves, the qtype,
  channel axes and tiles set) wherever a rule quantizes the weight, and
  ``jax.ShapeDtypeStruct`` elsewhere; no statistics needed. Feed it (or any
  subtree of it) to :func:`quantize_params`, or to :func:`restore_qparams`.

  Args:
    model: a ``flax.linen.Module`` or ``flax.nnx.Module``.
    rules: the :class:`qlite.QuantizationRule` list.
    *example_args: example inputs to trace the model on (required).
    variables: the Linen variables; None for NNX.

  Returns:
    A tree of the params' structure with ``QArray`` /
    ``jax.ShapeDtypeStruct`` leaves.

  Raises:
    QliteError: no ``example_args``; a Linen model without ``variables``;
      the model cannot be traced on ``example_args``; a
      ``weight_tile_size`` that does not divide the contraction length.
    RuleError: an element of ``rules`` is not a ``QuantizationRule``.

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> from qlite import xla
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> rules = [qlite.QuantizationRule(act_qtype=None)]   # weight-only
    >>> abstract = xla.abstract_quantized_params(model, rules, x,
    ...                                          variables=variables)
    >>> abstract["params"]["kernel"].qtype.name, abstract["params"]["bias"]
    ('int8', ShapeDtypeStruct(shape=(4,), dtype=float32))
  """
  if not example_args:
    raise QliteError("abstract_quantized_params needs example args to trace "
                     "the model")
  provider = PtqProvider(rules)
  provider._activation_scales = False   # weight layouts need no stats
  qm = PtqModel(model, provider, variables)
  if qm.mf.params is None:
    raise QliteError(f"{qm.mf.description} is a Linen module: pass "
                     f"variables=...")
  graph, state = qm.traced(example_args)
  leaves, tree = jax.tree.flatten(qm.mf.params)
  out = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]
  for i, op in state.param_ops().items():
    x = leaves[i]
    out[i] = _placeholder(np.shape(x), x.dtype, op.rule.weight_qtype,
                          op.channel_axes, op.tile_sizes,
                          op.rule.weight_calibration_method)
  return jax.tree.unflatten(tree, out)


def _quantize_like(x, abstract: QArray) -> QArray:
  if tuple(np.shape(x)) != abstract.shape:
    raise QliteError(f"quantize_params: a weight has shape "
                     f"{tuple(np.shape(x))}, its abstract QArray "
                     f"{abstract.shape}: pass the matching subtree")
  method = "minmax" if abstract.zero_point is not None else "absmax"
  return quantize(jnp.asarray(x), abstract.qtype,
                  channel_axes=abstract.channel_axes,
                  tile_sizes=dict(abstract.tile_sizes) or None,
                  method=method, narrow_range=abstract.qtype.is_int)


def _same(x, abstract):
  if not hasattr(x, "shape") or tuple(np.shape(x)) != tuple(
      np.shape(abstract)):
    raise QliteError(f"quantize_params: a leaf of fp_params "
                     f"({type(x).__name__}, shape {np.shape(x)}) does not "
                     f"match abstract_qparams (shape {np.shape(abstract)}): "
                     f"pass matching (sub)trees")
  return x


def quantize_params(fp_params, abstract_qparams, quant_stats=None):
  """Quantizes the weights that ``abstract_qparams`` marks with a QArray.

  Every weight under a placeholder QArray is quantized to that QArray's
  qtype / channel axes / tiles; other leaves are returned unchanged.
  ``fp_params`` and ``abstract_qparams`` may be matching subtrees (one
  layer at a time, e.g. while streaming a checkpoint).

  Args:
    fp_params: the float params (Linen variables / NNX state, or a subtree).
    abstract_qparams: the matching (sub)tree of
      :func:`abstract_quantized_params`.
    quant_stats: accepted for symmetry with the ODML path but not needed:
      SRQ activation scales are applied by :class:`PtqProvider`
      (``PtqProvider(rules, stats)``).

  Returns:
    ``fp_params`` with ``QArray`` leaves for the quantized weights.

  Raises:
    QliteError: the trees do not match, or a weight's shape differs.

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> from qlite import xla
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> rules = [qlite.QuantizationRule(act_qtype=None)]   # weight-only
    >>> abstract = xla.abstract_quantized_params(model, rules, x,
    ...                                          variables=variables)
    >>> qparams = xla.quantize_params(variables, abstract)
    >>> qm = xla.quantize_model(model, xla.PtqProvider(rules),
    ...                         variables=variables)
    >>> qm.apply(qparams, x).shape
    (1, 4)
    >>> kernel = xla.quantize_params(variables["params"]["kernel"],
    ...                              abstract["params"]["kernel"])  # a subtree
  """
  del quant_stats
  try:
    return jax.tree.map(
        lambda a, x: _quantize_like(x, a) if is_qarray(a) else _same(x, a),
        abstract_qparams, fp_params, is_leaf=is_qarray)
  except ValueError as e:
    if isinstance(e, QliteError):
      raise
    raise QliteError(f"quantize_params: fp_params and abstract_qparams do "
                     f"not have the same structure ({e}); pass matching "
                     f"(sub)trees") from None


def param_bytes(params) -> int:
  """Returns the storage bytes of a params tree (QArrays counted packed:
  int4 as half a byte)."""
  total = 0
  for x in jax.tree.leaves(params, is_leaf=is_qarray):
    if is_qarray(x):
      total += x.nbytes
    else:
      total += int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
  return total


def _to_storable(x):
  # tensorstore has no int4: store int4 as int8, restore casts back.
  if is_qarray(x) and np.dtype(x.qvalue.dtype) == _INT4:
    return QArray(jnp.asarray(x.qvalue).astype(jnp.int8), x.scale,
                  x.zero_point, x.qtype, x.channel_axes, x.tile_sizes, x.dtype)
  return x


def _storable_abstract(a):
  if is_qarray(a):
    qv = a.qvalue
    dtype = np.int8 if np.dtype(qv.dtype) == _INT4 else qv.dtype
    return QArray(jax.ShapeDtypeStruct(qv.shape, dtype),
                  jax.ShapeDtypeStruct(a.scale.shape, a.scale.dtype),
                  None if a.zero_point is None else
                  jax.ShapeDtypeStruct(a.zero_point.shape, np.int32),
                  a.qtype, a.channel_axes, a.tile_sizes, a.dtype)
  return jax.ShapeDtypeStruct(np.shape(a), a.dtype)


def save_qparams(path: str | os.PathLike, qparams) -> None:
  """Saves quantized params with orbax (``path`` must not exist).

  int4 values are stored as int8 (tensorstore has no int4);
  :func:`restore_qparams` casts them back.

  Args:
    path: a directory that does not exist yet.
    qparams: params with ``QArray`` leaves (:func:`quantize_params`).

  Returns:
    None.

  Raises:
    ValueError: ``path`` already exists (raised by orbax).

  Example:
    >>> xla.save_qparams("/tmp/qckpt", qparams)   # qparams: quantize_params'
  """
  import orbax.checkpoint as ocp
  tree = jax.tree.map(_to_storable, qparams, is_leaf=is_qarray)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), tree)


def restore_qparams(path: str | os.PathLike, abstract_qparams):
  """Returns the quantized params saved at ``path`` by :func:`save_qparams`.

  Args:
    path: the checkpoint directory.
    abstract_qparams: from :func:`abstract_quantized_params` (same model and
      rules as the saved params): gives the structure, qtypes and layouts.

  Returns:
    The params tree with ``QArray`` leaves, as saved.

  Raises:
    FileNotFoundError: no checkpoint at ``path`` (raised by orbax).

  Example:
    >>> qparams = xla.restore_qparams("/tmp/qckpt", abstract)
    >>> qm.apply(qparams, x).shape   # as in quantize_params' example
    (1, 4)
  """
  import orbax.checkpoint as ocp
  target = jax.tree.map(_storable_abstract, abstract_qparams,
                        is_leaf=is_qarray)
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(os.path.abspath(path), target)

  def back(a, x):
    if is_qarray(a) and np.dtype(a.qvalue.dtype) == _INT4:
      return QArray(jnp.asarray(x.qvalue).astype(jnp.int4), x.scale,
                    x.zero_point, x.qtype, x.channel_axes, x.tile_sizes,
                    x.dtype)
    return x
  return jax.tree.map(back, abstract_qparams, tree, is_leaf=is_qarray)
