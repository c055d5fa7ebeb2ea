"""QArray: a quantized array (values + scales) that is a JAX pytree.

Layout
------
* ``qvalue`` has the original shape and ``qtype.storage_dtype``.
* ``scale`` (float32) and ``zero_point`` (int32, or None) have the same rank
  as the original array, with, per axis: the axis length for a channel axis,
  the number of tiles for a tiled (sub-channel) axis, and 1 otherwise. For
  per-channel ``(K, N)`` weights with ``channel_axes=(1,)`` the scale is
  ``(1, N)``: it broadcasts against ``qvalue`` directly.
* With tiles, view the values in the *tiled layout* (each tiled axis ``a`` of
  length ``d`` split into ``(d // t, t)``): ``qvalue.reshape(qa.tiled_shape)``
  broadcasts against the scale returned by :meth:`QArray.tiled_scale`.
* ``zero_point`` is None for symmetric signed ints, fp8 and nf4.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qlite.core import numerics
from qlite.core import qtypes as qt_lib
from qlite.core.qtypes import QType, get_qtype
from qlite.errors import QliteError

__all__ = ["QArray", "quantize", "dequantize", "is_qarray", "RANGE_METHODS"]

RANGE_METHODS = ("absmax", "minmax")

_SUBBYTE_BITS = {np.dtype(ml_dtypes.int4): 4, np.dtype(ml_dtypes.uint4): 4}
for _name in ("int2", "uint2"):
  if hasattr(ml_dtypes, _name):
    _SUBBYTE_BITS[np.dtype(getattr(ml_dtypes, _name))] = 2


def _storage_nbytes(a) -> int:
  """Returns the bytes ``a`` occupies, counting sub-byte dtypes packed (int4: 1/2 byte)."""
  if a is None:
    return 0
  dtype = np.dtype(a.dtype)
  size = math.prod(a.shape)
  bits = _SUBBYTE_BITS.get(dtype, dtype.itemsize * 8)
  return (size * bits + 7) // 8


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class QArray:
  """A quantized array: ``dequantize() ~= (qvalue - zero_point) * scale``.

  A pytree whose children are ``qvalue``, ``scale`` and ``zero_point``; the
  other fields are static. Build one with :func:`quantize`.

  Attributes:
    qvalue: quantized values, original shape, ``qtype.storage_dtype``.
    scale: float32 scales (see the module docstring for the layout).
    zero_point: int32 zero points shaped like ``scale``, or None.
    qtype: the :class:`QType`.
    channel_axes: sorted non-negative axes with one scale per index.
    tile_sizes: sorted ``((axis, tile_size), ...)`` of sub-channel tiled axes.
    dtype: the original (float) dtype.
  """

  qvalue: Any
  scale: Any
  zero_point: Any
  qtype: QType
  channel_axes: tuple[int, ...] = ()
  tile_sizes: tuple[tuple[int, int], ...] = ()
  dtype: Any = np.dtype(np.float32)

  @property
  def shape(self) -> tuple[int, ...]:
    """Returns the original (unquantized) shape."""
    return tuple(self.qvalue.shape)

  original_shape = shape

  @property
  def ndim(self) -> int:
    """Returns the number of dimensions of the original array."""
    return len(self.qvalue.shape)

  @property
  def nbytes(self) -> int:
    """Returns storage bytes of qvalue + scale + zero_point (int4 counted as 1/2 byte)."""
    return (_storage_nbytes(self.qvalue) + _storage_nbytes(self.scale)
            + _storage_nbytes(self.zero_point))

  @property
  def tiled_shape(self) -> tuple[int, ...]:
    """Returns the shape with each tiled axis ``d`` split into ``(d // t, t)``."""
    tiles = dict(self.tile_sizes)
    out = []
    for i, d in enumerate(self.shape):
      out.extend((d // tiles[i], tiles[i]) if i in tiles else (d,))
    return tuple(out)

  def tiled_scale(self):
    """Returns ``(scale, zero_point)`` reshaped to broadcast against the tiled layout.

    ``zero_point`` is None when the QArray has none. Without tiles these are
    ``scale`` and ``zero_point`` unchanged.
    """
    tiles = dict(self.tile_sizes)
    shape = []
    for i, d in enumerate(self.scale.shape):
      shape.extend((d, 1) if i in tiles else (d,))
    zp = None if self.zero_point is None else self.zero_point.reshape(shape)
    return self.scale.reshape(shape), zp

  def dequantize(self, dtype=None):
    """Returns the dequantized jax array of the original shape (float32 unless ``dtype``)."""
    return _dequantize_jit(self, np.dtype(dtype or np.float32))

  def _dequantize_impl(self, dtype):
    scale, zp = self.tiled_scale()
    q = jnp.asarray(self.qvalue).reshape(self.tiled_shape)
    x = numerics.dequantize_values(q, jnp.asarray(scale),
                                   None if zp is None else jnp.asarray(zp),
                                   self.qtype)
    return x.reshape(self.shape).astype(dtype)

  def __repr__(self) -> str:
    tiles = dict(self.tile_sizes)
    return (f"QArray({self.qtype.name}, shape={self.shape}, "
            f"scale_shape={tuple(self.scale.shape)}, "
            f"channel_axes={self.channel_axes}, tile_sizes={tiles}, "
            f"zero_point={'yes' if self.zero_point is not None else 'no'}, "
            f"dtype={np.dtype(self.dtype).name})")


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_jit(qa: QArray, dtype):
  return qa._dequantize_impl(dtype)  # pylint: disable=protected-access


jax.tree_util.register_dataclass(
    QArray,
    data_fields=["qvalue", "scale", "zero_point"],
    meta_fields=["qtype", "channel_axes", "tile_sizes", "dtype"])


def _normalize_tiles(tile_sizes: Mapping[int, int] | None,
                     shape: tuple[int, ...],
                     channel_axes: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """Returns sorted ``((axis, tile), ...)``; raises QliteError on a bad tiling."""
  if not tile_sizes:
    return ()
  out = {}
  for axis, tile in dict(tile_sizes).items():
    (a,) = numerics.normalize_axes((axis,), len(shape))
    if a in out:
      raise QliteError(f"axis {axis} appears twice in tile_sizes {tile_sizes}.")
    if a in channel_axes:
      raise QliteError(
          f"axis {axis} is both a channel axis and a tiled axis; a tiled axis "
          "already gets one scale per tile. Remove it from channel_axes.")
    if not isinstance(tile, (int, np.integer)) or tile <= 0:
      raise QliteError(f"tile size for axis {axis} must be a positive int, "
                       f"got {tile!r}.")
    if shape[a] % tile:
      raise QliteError(
          f"axis {axis} has length {shape[a]}, which is not divisible by tile "
          f"size {tile}; pick a tile size that divides {shape[a]}.")
    out[a] = int(tile)
  return tuple(sorted(out.items()))


@functools.partial(jax.jit, static_argnums=range(1, 8))
def _quantize_arrays(x, qt, tiled_shape, reduce_axes, compact_shape,
                     symmetric, narrow_range, method):
  """Returns ``(qvalue, scale, zero_point)``: the array part of :func:`quantize`."""
  xt = x.astype(jnp.float32).reshape(tiled_shape)
  if method == "absmax":
    hi = jnp.max(jnp.abs(xt), axis=reduce_axes, keepdims=True)
    lo = -hi
  else:
    lo = jnp.min(xt, axis=reduce_axes, keepdims=True)
    hi = jnp.max(xt, axis=reduce_axes, keepdims=True)
  scale, zp = numerics.scale_zero_point(
      lo, hi, qt, symmetric=symmetric, narrow_range=narrow_range)
  q = numerics.quantize_values(xt, scale, zp, qt, narrow_range=narrow_range)
  return (q.reshape(x.shape), scale.reshape(compact_shape),
          zp.reshape(compact_shape))


def quantize(x, qtype: str | QType, *, channel_axes: Sequence[int] = (),
             tile_sizes: Mapping[int, int] | None = None,
             symmetric: bool = True, narrow_range: bool = False,
             method: str = "absmax") -> QArray:
  """Returns ``x`` quantized to ``qtype`` as a :class:`QArray`. Jittable.

  Args:
    x: a float array (numpy or jax).
    qtype: a qtype name or :class:`QType`.
    channel_axes: axes with one scale per index; ``()`` is per-tensor.
      Negative axes count from the end.
    tile_sizes: ``{axis: t}`` splits ``axis`` into tiles of ``t`` elements,
      each with its own scale (sub-channel quantization).
    symmetric: zero point 0 (ignored for ``method="minmax"``, which is always
      asymmetric, and for fp8 / nf4, which are always symmetric).
    narrow_range: for ints, do not use the lowest code (int8: -127..127).
    method: ``"absmax"`` (range ``[-max|x|, max|x|]``) or ``"minmax"``.
  Raises:
    QTypeError: unknown ``qtype``.
    QliteError: unknown ``method``; a bad axis; a tiled axis whose length is
      not divisible by its tile size, or that is also a channel axis.
  """
  qt = get_qtype(qtype)
  if method not in RANGE_METHODS:
    raise QliteError(f"Unknown range method {method!r}; valid: {RANGE_METHODS}.")
  x = jnp.asarray(x)
  dtype = numerics.float_dtype_or_f32(x.dtype)
  channel = numerics.normalize_axes(channel_axes, x.ndim)
  tiles = _normalize_tiles(tile_sizes, x.shape, channel)
  tile_map = dict(tiles)

  tiled_shape, keep, compact_shape = [], [], []
  for i, d in enumerate(x.shape):
    if i in tile_map:
      keep.append(len(tiled_shape))
      tiled_shape.extend((d // tile_map[i], tile_map[i]))
      compact_shape.append(d // tile_map[i])
    else:
      if i in channel:
        keep.append(len(tiled_shape))
      tiled_shape.append(d)
      compact_shape.append(d if i in channel else 1)
  reduce_axes = tuple(i for i in range(len(tiled_shape)) if i not in keep)

  if method == "minmax":
    symmetric = False
  has_zp = qt.kind == qt_lib.INT and (not symmetric or not qt.signed)
  q, scale, zp = _quantize_arrays(
      x, qt, tuple(tiled_shape), reduce_axes, tuple(compact_shape),
      bool(symmetric), bool(narrow_range), method)
  return QArray(
      qvalue=q,
      scale=scale,
      zero_point=zp if has_zp else None,
      qtype=qt,
      channel_axes=channel,
      tile_sizes=tiles,
      dtype=dtype)


def is_qarray(x) -> bool:
  """True for a :class:`QArray` (use as ``is_leaf`` when walking param trees
  that hold quantized weights)."""
  return isinstance(x, QArray)


def dequantize(qa: QArray, dtype=None):
  """Returns ``qa`` dequantized: a jax array of the original shape (float32 unless ``dtype``).

  Raises:
    QliteError: ``qa`` is not a QArray.
  """
  if not isinstance(qa, QArray):
    raise QliteError(f"dequantize expects a QArray, got {type(qa).__name__}.")
  return qa.dequantize(dtype)
