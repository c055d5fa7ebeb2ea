"""Quantization math shared by every backend: scales, zero points, rounding.

Conventions
-----------
* ``real = (q - zero_point) * scale``; ``q = clip(round(real / scale) + zero_point)``
  with round-half-to-even. Symmetric qtypes use ``zero_point = 0``.
* ``scale`` and ``zero_point`` are already shaped to broadcast against ``x``:
  the reduced axes are kept with size 1 ("keepdims" shape). A per-tensor scale
  of a ``(K, N)`` weight has shape ``()`` or ``(1, 1)``; per output channel it
  is ``(1, N)``. :func:`keepdims_shape` builds such shapes.
* ``scale`` is float32, ``zero_point`` int32 (cast to int64 where a consumer,
  e.g. the LiteRT composite, wants it).
* Every function works on numpy arrays (returns numpy) and on jax arrays,
  including inside ``jax.jit`` (returns jax arrays): the array module is
  picked from the argument types.
* Zero range: when the calibrated range is ``[0, 0]`` (a constant-zero
  tensor) or so small that the scale would be below float32's smallest normal
  number, the scale is :data:`ZERO_RANGE_SCALE` (1e-8) instead of dividing by
  zero. Zero is then reconstructed exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qlite.core import qtypes as qt_lib
from qlite.core.qtypes import QType, get_qtype
from qlite.errors import QliteError, QTypeError

__all__ = [
    "ZERO_RANGE_SCALE",
    "scale_zero_point",
    "quantize_values",
    "dequantize_values",
    "fake_quant",
    "normalize_axes",
    "keepdims_shape",
    "float_dtype_or_f32",
]

ZERO_RANGE_SCALE = 1e-8
"""Scale used where the range is zero (or the scale underflows float32)."""

_F32_TINY = float(np.finfo(np.float32).tiny)

Array = Any


def _xp(*args):
  """Returns ``jnp`` if any argument is a jax array or tracer, else ``np``."""
  for a in args:
    if isinstance(a, jax.Array):
      return jnp
  return np


def normalize_axes(axes: Sequence[int] | int, ndim: int) -> tuple[int, ...]:
  """Returns ``axes`` as sorted non-negative ints (negative axes count from the end).

  Raises:
    QliteError: an axis is out of range for ``ndim`` or repeated.
  """
  if isinstance(axes, (int, np.integer)):
    axes = (axes,)
  out = []
  for a in axes:
    a = int(a)
    if not -ndim <= a < ndim:
      raise QliteError(f"axis {a} is out of range for an array with {ndim} dims.")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise QliteError(f"repeated axis in {tuple(axes)} (for {ndim} dims).")
  return tuple(sorted(out))


def keepdims_shape(shape: Sequence[int], keep_axes: Sequence[int]) -> tuple[int, ...]:
  """Returns ``shape`` with every axis not in ``keep_axes`` set to 1.

  This is the shape of a scale that broadcasts against an array of ``shape``
  (one scale per index along ``keep_axes``). Raises QliteError on bad axes.
  """
  keep = normalize_axes(keep_axes, len(shape))
  return tuple(d if i in keep else 1 for i, d in enumerate(shape))


def scale_zero_point(min_val, max_val, qtype: str | QType, *, symmetric: bool,
                     narrow_range: bool):
  """Returns ``(scale, zero_point)`` mapping ``[min_val, max_val]`` to ``qtype``.

  Elementwise over arrays of mins / maxes. The range is first extended to
  contain 0. Then:

  * int, asymmetric: ``scale = (max - min) / (qmax - qmin)``,
    ``zero_point = clip(round(qmin - min / scale), qmin, qmax)``
    (``qmin`` is ``qmin + 1`` with ``narrow_range``).
  * int, symmetric, signed: ``scale = absmax / qmax``, ``zero_point = 0``.
  * int, symmetric, unsigned (uint8): ``zero_point = 2**(bits-1)`` (128),
    ``scale = absmax / (qmax - zero_point)``.
  * float (fp8): ``scale = absmax / max_finite``, ``zero_point = 0``.
  * nf4: ``scale = absmax`` (levels are normalized to [-1, 1]), ``zero_point = 0``.

  A scale below float32's smallest normal number (zero range) is replaced by
  :data:`ZERO_RANGE_SCALE`. NaN ranges stay NaN.

  Returns:
    ``scale`` (float32) and ``zero_point`` (int32), numpy arrays for numpy
    inputs and jax arrays for jax inputs, broadcast shape of the inputs.
  Raises:
    QTypeError: unknown ``qtype``.
  """
  qt = get_qtype(qtype)
  xp = _xp(min_val, max_val)
  lo = xp.minimum(xp.asarray(min_val, dtype=xp.float32), 0.0)
  hi = xp.maximum(xp.asarray(max_val, dtype=xp.float32), 0.0)
  lo, hi = xp.broadcast_arrays(lo, hi)
  absmax = xp.maximum(-lo, hi)

  def safe(scale):
    return xp.where(scale < _F32_TINY, xp.float32(ZERO_RANGE_SCALE), scale)

  zeros = xp.zeros(lo.shape, dtype=xp.int32)
  if qt.kind == qt_lib.FLOAT:
    scale = safe(absmax / xp.float32(qt.qmax))
    return xp.asarray(scale, dtype=xp.float32), zeros
  if qt.kind == qt_lib.NF4:
    return xp.asarray(safe(absmax), dtype=xp.float32), zeros

  qmax = float(qt.qmax)
  qmin = float(qt.narrow_qmin(narrow_range))
  if symmetric:
    if qt.signed:
      scale = safe(absmax / xp.float32(qmax))
      return xp.asarray(scale, dtype=xp.float32), zeros
    mid = 1 << (qt.bits - 1)
    scale = safe(absmax / xp.float32(qmax - mid))
    return xp.asarray(scale, dtype=xp.float32), zeros + mid
  scale = safe((hi - lo) / xp.float32(qmax - qmin))
  zp = xp.clip(xp.round(xp.float32(qmin) - lo / scale), qmin, qmax)
  return xp.asarray(scale, dtype=xp.float32), xp.asarray(zp.astype(xp.int32))


def _prepare(xp, x, scale, zero_point):
  x = xp.asarray(x, dtype=xp.float32)
  scale = xp.asarray(scale, dtype=xp.float32)
  if zero_point is None:
    zp = xp.float32(0.0)
  else:
    zp = xp.asarray(zero_point).astype(xp.float32)
  return x, scale, zp


ROUNDINGS = ("half_even", "half_away", "none")


def _int_codes(xp, x, scale, zp, qt: QType, narrow_range: bool,
               rounding: str = "half_even"):
  """Returns float32 integer-valued codes ``clip(round(x / scale) + zp)``.

  ``rounding="half_away"``: ``x / scale + zp`` rounded half away from zero,
  after snapping it to a 1/1024 grid (exact ties survive float error).
  LiteRT's int8 AVERAGE_POOL_2D (builtin and XNNPACK) rounds the raw code
  sum / count that way; half-to-even there left the fake-quant model up to
  1 LSB off at every tie. ``rounding="none"`` is handled by
  :func:`fake_quant` (the value passes unquantized)."""
  lo = float(qt.narrow_qmin(narrow_range))
  if rounding == "half_away":
    t = xp.round((x / scale + zp) * 1024.0) / 1024.0
    q = xp.sign(t) * xp.floor(xp.abs(t) + 0.5)
  elif rounding == "half_even":
    q = xp.round(x / scale) + zp
  else:
    raise QTypeError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
  return xp.clip(q, lo, float(qt.qmax))


def _nf4_codes(xp, x, scale):
  """Returns int32 indices of the nearest NF4 level to ``x / scale``."""
  levels = qt_lib.NF4_LEVELS
  midpoints = xp.asarray((levels[1:] + levels[:-1]) / 2, dtype=xp.float32)
  return xp.searchsorted(midpoints, x / scale).astype(xp.int32)


def quantize_values(x, scale, zero_point, qtype: str | QType, *,
                    narrow_range: bool = False):
  """Returns ``x`` quantized to ``qtype``, in ``qtype.storage_dtype``.

  int: ``clip(round_half_even(x / scale) + zero_point, qmin, qmax)``;
  fp8: ``x / scale`` clipped to +-max_finite and cast (round to nearest even);
  nf4: uint8 index of the nearest level of ``x / scale``. ``zero_point`` may
  be None (treated as 0) and is ignored for fp8 / nf4. ``scale`` and
  ``zero_point`` must broadcast against ``x``.

  Raises:
    QTypeError: unknown ``qtype``.
  """
  qt = get_qtype(qtype)
  xp = _xp(x, scale, zero_point)
  x, scale, zp = _prepare(xp, x, scale, zero_point)
  if qt.kind == qt_lib.INT:
    return xp.asarray(
        _int_codes(xp, x, scale, zp, qt, narrow_range).astype(qt.storage_dtype))
  if qt.kind == qt_lib.FLOAT:
    v = xp.clip(x / scale, float(qt.qmin), float(qt.qmax))
    return xp.asarray(v.astype(qt.storage_dtype))
  return xp.asarray(_nf4_codes(xp, x, scale).astype(qt.storage_dtype))


def dequantize_values(q, scale, zero_point, qtype: str | QType):
  """Returns float32 ``(q - zero_point) * scale`` (nf4: ``NF4_LEVELS[q] * scale``).

  ``zero_point`` may be None (treated as 0); it is ignored for fp8 / nf4.
  Raises:
    QTypeError: unknown ``qtype``.
  """
  qt = get_qtype(qtype)
  xp = _xp(q, scale, zero_point)
  scale = xp.asarray(scale, dtype=xp.float32)
  if qt.kind == qt_lib.NF4:
    levels = xp.asarray(qt_lib.NF4_LEVELS)
    return xp.asarray(levels[xp.asarray(q).astype(xp.int32)] * scale)
  values = xp.asarray(q).astype(xp.float32)
  if qt.kind == qt_lib.INT and zero_point is not None:
    values = values - xp.asarray(zero_point).astype(xp.float32)
  return xp.asarray(values * scale)


_KEEP_DTYPES = tuple(np.dtype(d) for d in (
    jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))


def float_dtype_or_f32(dtype):
  """Returns ``dtype`` if it is a compute float dtype (f16/bf16/f32/f64), else float32."""
  if dtype is not None and np.dtype(dtype) in _KEEP_DTYPES:
    return np.dtype(dtype)
  return np.dtype(np.float32)


def fake_quant(x, scale, zero_point, qtype: str | QType, *,
               narrow_range: bool = False, rounding: str = "half_even"):
  """Returns ``dequantize_values(quantize_values(x, ...))`` computed in float
  (int qtypes: ``rounding`` as in ``_int_codes``). ``rounding="none"``
  returns ``x`` as it is: a value LiteRT never quantizes at this scale (an
  ADD whose relu fuses into its kernel requantizes straight to the relu's
  output scale).

  Jittable; the result has ``x``'s dtype when ``x`` is floating, else float32.
  No straight-through estimator is attached (``round`` has zero gradient).
  Raises:
    QTypeError: unknown ``qtype``.
  """
  qt = get_qtype(qtype)
  xp = _xp(x, scale, zero_point)
  out_dtype = float_dtype_or_f32(getattr(x, "dtype", None))
  if rounding == "none":
    return xp.asarray(xp.asarray(x).astype(out_dtype))
  x, scale, zp = _prepare(xp, x, scale, zero_point)
  if qt.kind == qt_lib.INT:
    y = (_int_codes(xp, x, scale, zp, qt, narrow_range, rounding) - zp) * scale
  elif qt.kind == qt_lib.FLOAT:
    v = xp.clip(x / scale, float(qt.qmin), float(qt.qmax))
    y = v.astype(qt.storage_dtype).astype(xp.float32) * scale
  else:
    levels = xp.asarray(qt_lib.NF4_LEVELS)
    y = levels[_nf4_codes(xp, x, scale)] * scale
  return xp.asarray(y.astype(out_dtype))
