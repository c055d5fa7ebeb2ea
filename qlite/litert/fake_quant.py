"""The ``quant.fake_quant`` composite: a quantization boundary the LiteRT
converter turns into int8 tensors (its decomposition is the float fake-quant,
so the same function also runs as "qlite fake-quant JAX")."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qlite.core import numerics
from qlite.core.qtypes import QType, get_qtype
from qlite.errors import ConversionError, QTypeError

_MLIR_INT = {8: "i8", 16: "i16", 4: "i4"}


def mlir_dtype(qtype: QType) -> str:
  """Returns the composite's ``dtype`` attribute for ``qtype``.

  Raises:
    QTypeError: LiteRT has no integer kernels for this qtype.
  """
  if qtype.kind != "int" or not qtype.signed or qtype.bits not in _MLIR_INT:
    raise QTypeError(
        f"qtype {qtype.name!r} cannot be exported to LiteRT: its integer "
        f"kernels take int8 (or int16 / int4 weights); use 'int8'")
  return _MLIR_INT[qtype.bits]


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _fake_quant_jit(v, s, z, qtype: str, narrow_range: bool,
                    rounding: str = "half_even"):
  """The composite's decomposition body, jitted so that tracing it is cached
  per shape (one trace serves every boundary of a shape: tracing the body
  afresh for each of a model's ~100 composites cost ~0.3 s of export)."""
  return numerics.fake_quant(v, s, z, qtype, narrow_range=narrow_range,
                             rounding=rounding).astype(v.dtype)


def fake_quant(x, scale, zero_point, qtype, *, narrow_range: bool = False,
               axis: int | None = None, rounding: str = "half_even"):
  """Returns ``x`` wrapped in a ``quant.fake_quant`` composite.

  ``scale`` / ``zero_point``: 1 value (per tensor) or one per index along
  ``axis`` (per channel). They must be concrete (numpy) values.
  ``rounding``: of the JAX decomposition only (``numerics.fake_quant``);
  the converter reads the scale and zero point.
  """
  qt = get_qtype(qtype)
  scale = np.asarray(scale, np.float32).reshape(-1)
  if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
    raise ConversionError(
        f"quantization scale {scale[:4]} is not finite and positive (a "
        f"NaN / Inf range: the tensor or constant holds non-finite values)")
  zero_point = np.asarray(zero_point, np.int64).reshape(-1)
  ndim = np.ndim(x)

  def decomposition(v, **_):
    if axis is None:
      s, z = scale[0], zero_point[0]
    else:
      shape = [1] * ndim
      shape[axis] = -1
      s, z = scale.reshape(shape), zero_point.reshape(shape)
    return _fake_quant_jit(v, np.asarray(s, np.float32),
                           np.asarray(z, np.int32), qt.name, narrow_range,
                           rounding)

  attrs = dict(dtype=mlir_dtype(qt), narrow_range=bool(narrow_range),
               scale=scale, zero_point=zero_point)
  if axis is not None:
    attrs["quantization_dimension"] = int(axis)
  return jax.lax.composite(decomposition, name="quant.fake_quant")(x, **attrs)


def channel_scale(w, qtype, axis: int | None, method: str = "absmax"):
  """Returns ``(scale, zero_point)`` of a weight, shaped to broadcast against
  it (keepdims): per channel along ``axis`` (per tensor when None),
  symmetric narrow range for ``absmax``. numpy in, numpy out; jax in, jax out
  (traceable: QAT uses the same rule as export).

  An all-zero channel gets scale 1/127: any scale represents it exactly, and
  a tiny one would overflow that channel's int32 bias (bias / (input scale *
  weight scale)) in LiteRT.
  """
  xp = np if isinstance(w, np.ndarray) else jnp
  reduce = tuple(i for i in range(w.ndim) if i != axis) if axis is not None \
      else tuple(range(w.ndim))
  lo = xp.min(w, axis=reduce, keepdims=True)
  hi = xp.max(w, axis=reduce, keepdims=True)
  sym = method == "absmax"
  s, z = numerics.scale_zero_point(lo, hi, qtype, symmetric=sym,
                                   narrow_range=sym)
  dead = (lo == 0) & (hi == 0)
  return xp.where(dead, xp.float32(1.0 / 127.0), s).astype(xp.float32), z


def weight_scale(w, qtype, axis: int | None, method: str = "absmax"):
  """Returns (scale, zero_point) 1-D numpy arrays of a weight (see
  :func:`channel_scale`), as the ``quant.fake_quant`` composite takes them."""
  w = np.asarray(w, np.float32)
  if w.size == 0:
    return np.full(1, 1.0 / 127.0, np.float32), np.zeros(1, np.int64)
  s, z = channel_scale(w, qtype, axis, method)
  return np.asarray(s, np.float32).reshape(-1), \
      np.asarray(z, np.int64).reshape(-1)
