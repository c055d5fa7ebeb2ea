"""Offline weight quantization: abstract quantized params, ``quantize_params``
(whole tree or any subtree, e.g. layer by layer while loading) and orbax
save / restore of the result."""

from __future__ import annotations

import os
import stat
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qlite.core import numerics
from qlite.core import stats as stats_lib
from qlite.core.qarray import QArray, is_qarray, quantize
from qlite.core.qtypes import get_qtype
from qlite.errors import QliteError
from qlite.rules import QuantizationRule
from qlite.xla import sharding as sharding_lib
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
  q = quantize(jnp.asarray(x), abstract.qtype,
               channel_axes=abstract.channel_axes,
               tile_sizes=dict(abstract.tile_sizes) or None,
               method=method, narrow_range=abstract.qtype.is_int)
  return sharding_lib.follow(q, x, abstract)   # keeps a mesh layout


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
    sh = lambda v: getattr(v, "sharding", None)   # restore onto a mesh
    return QArray(jax.ShapeDtypeStruct(qv.shape, dtype, sharding=sh(qv)),
                  jax.ShapeDtypeStruct(a.scale.shape, a.scale.dtype,
                                       sharding=sh(a.scale)),
                  None if a.zero_point is None else
                  jax.ShapeDtypeStruct(a.zero_point.shape, np.int32,
                                       sharding=sh(a.zero_point)),
                  a.qtype, a.channel_axes, a.tile_sizes, a.dtype)
  return jax.ShapeDtypeStruct(np.shape(a), a.dtype,
                              sharding=getattr(a, "sharding", None))


def _checkpointer():
  import orbax.checkpoint as ocp
  # Directories are created synchronously: created in the background, a
  # failed mkdir left orbax's signalling threads waiting ~5 minutes.
  return ocp.StandardCheckpointer(async_options=ocp.options.AsyncOptions(
      create_directories_asynchronously=False))


def save_qparams(path: str | os.PathLike, qparams, *,
                 overwrite: bool = False) -> None:
  """Saves quantized params with orbax into the new directory ``path``.

  int4 values are stored as int8 (tensorstore has no int4);
  :func:`restore_qparams` casts them back. ``overwrite=True`` replaces an
  existing checkpoint directory: the new one is written beside it first
  and swapped in (keeping the old directory's mode), so a failure leaves
  the old one. Files and directories follow the umask.

  Args:
    path: a directory that does not exist yet (``str`` or
      ``os.PathLike``), or an existing checkpoint with ``overwrite=True``.
    qparams: params with ``QArray`` leaves (:func:`quantize_params`).
    overwrite: replace an existing checkpoint at ``path``.

  Returns:
    None.

  Raises:
    QliteError: ``path`` is not a ``str`` / ``os.PathLike`` (e.g. bytes),
      exists (without ``overwrite``) or is a file, its parent directory is
      missing or not writable, or orbax failed; the message names the path.

  Example:
    >>> xla.save_qparams("/tmp/qckpt", qparams)   # qparams: quantize_params'
  """
  import shutil
  what = "save_qparams"
  path = os.path.abspath(stats_lib.check_path(path, what))
  parent = os.path.dirname(path)
  if not os.path.isdir(parent):
    raise QliteError(f"{what}: cannot write {path!r}: directory {parent!r} "
                     f"does not exist; create it first")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise QliteError(f"{what}: cannot write {path!r}: permission denied "
                     f"(is {parent!r} writable?)")
  exists = os.path.lexists(path)
  if exists and not os.path.isdir(path):
    raise QliteError(f"{what}: cannot write {path!r}: it exists and is not "
                     f"a directory (a checkpoint is a directory)")
  if exists and not overwrite:
    raise QliteError(f"{what}: cannot write {path!r}: it already exists; "
                     f"pass overwrite=True or choose a new path")
  tree = jax.tree.map(_to_storable, qparams, is_leaf=is_qarray)
  target = path
  if exists:
    target = os.path.join(parent, f".{os.path.basename(path)}.qlite-new-"
                          f"{os.getpid()}")
    shutil.rmtree(target, ignore_errors=True)
  try:
    with _checkpointer() as ckptr:
      ckptr.save(target, tree)
    if exists:
      os.chmod(target, stat.S_IMODE(os.stat(path).st_mode))
      old = os.path.join(parent, f".{os.path.basename(path)}.qlite-old-"
                         f"{os.getpid()}")
      os.replace(path, old)
      try:
        os.replace(target, path)
      except BaseException:
        os.replace(old, path)
        raise
      shutil.rmtree(old, ignore_errors=True)
  except QliteError:
    raise
  except BaseException as e:
    if exists:
      shutil.rmtree(target, ignore_errors=True)
    if isinstance(e, OSError):
      raise QliteError(stats_lib.os_error_message(what, "write", path, e)
                       ) from e
    if isinstance(e, Exception):
      raise QliteError(f"{what}: cannot write {path!r}: orbax failed: "
                       f"{type(e).__name__}: {e}") from e
    raise


def restore_qparams(path: str | os.PathLike, abstract_qparams):
  """Returns the quantized params saved at ``path`` by :func:`save_qparams`.

  Args:
    path: the checkpoint directory (``str`` or ``os.PathLike``).
    abstract_qparams: from :func:`abstract_quantized_params` (same model and
      rules as the saved params): gives the structure, qtypes and layouts.

  Returns:
    The params tree with ``QArray`` leaves, as saved.

  Raises:
    QliteError: ``path`` is not a ``str`` / ``os.PathLike``, does not exist,
      is not an orbax checkpoint directory, or holds params of another
      structure / shapes than ``abstract_qparams``; the message names the
      path.

  Example:
    >>> qparams = xla.restore_qparams("/tmp/qckpt", abstract)
    >>> qm.apply(qparams, x).shape   # as in quantize_params' example
    (1, 4)
  """
  what = "restore_qparams"
  path = os.path.abspath(stats_lib.check_path(path, what))
  if not os.path.exists(path):
    raise QliteError(f"{what}: no checkpoint at {path!r}: it does not "
                     f"exist")
  if not os.path.isdir(path):
    raise QliteError(f"{what}: {path!r} is not a checkpoint: a checkpoint "
                     f"written by save_qparams is a directory")
  target = jax.tree.map(_storable_abstract, abstract_qparams,
                        is_leaf=is_qarray)
  try:
    with _checkpointer() as ckptr:
      tree = ckptr.restore(path, target)
  except Exception as e:
    if isinstance(e, OSError) and e.errno is not None:
      raise QliteError(stats_lib.os_error_message(what, "read", path, e)
                       ) from e
    raise QliteError(f"{what}: cannot restore {path!r}: not a checkpoint "
                     f"written by save_qparams, or one of params of another "
                     f"structure / shapes than abstract_qparams "
                     f"({type(e).__name__}: {e})") from e

  def back(a, x):
    if is_qarray(a) and np.dtype(a.qvalue.dtype) == _INT4:
      return QArray(jnp.asarray(x.qvalue).astype(jnp.int4), x.scale,
                    x.zero_point, x.qtype, x.channel_axes, x.tile_sizes,
                    x.dtype)
    return x
  return jax.tree.map(back, abstract_qparams, tree, is_leaf=is_qarray)
