"""Trace well-known jax functions as single named ops.

While a model is traced, ``jax.nn.softmax`` and ``jax.nn.gelu`` (and every
module attribute that aliases them, e.g. ``flax.linen.gelu``) are replaced by
``jax.lax.composite`` ops whose names the LiteRT converter lowers to native
int8 kernels (``odml.softmax`` -> SOFTMAX, ``aten.gelu.default`` -> GELU).
Their decomposition is the original function, so the numbers in JAX do not
change; the plan sees one op instead of a dozen float primitives.
``jax.nn.leaky_relu`` traces as the identical ``max(x, slope * x)``.
2x bilinear ``jax.image.resize`` of NHWC images traces as
``odml.upsample_bilinear2d`` (-> one RESIZE_BILINEAR).
Flax LayerNorm (Linen and NNX) traces as ``x * m + (bias - mean * m)``
(:mod:`qlite.ops.layernorm`: fewer full-size int8 requantizations).
"""

from __future__ import annotations

import contextlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as _linen
from jax._src.interpreters import batching as _batching

from qlite.ops import layernorm as _layernorm

_ORIGINALS = {"softmax": jax.nn.softmax, "gelu": jax.nn.gelu,
              "leaky_relu": jax.nn.leaky_relu,
              "avg_pool": _linen.avg_pool, "max_pool": _linen.max_pool,
              "resize": jax.image.resize}


def _batched(x) -> bool:
  return isinstance(x, _batching.BatchTracer)


def _softmax_last(v):
  return _ORIGINALS["softmax"](v, axis=-1)


_BILINEAR = "odml.upsample_bilinear2d"

# Composites qlite emits, rebuilt from their attributes (for vmap).
_REBUILD = {
    "odml.softmax": lambda attrs: (_softmax_last, {}),
    "aten.gelu.default": lambda attrs: (
        lambda v, **_: _ORIGINALS["gelu"](
            v, approximate=attrs.get("approximate") == "tanh"),
        {"approximate": attrs.get("approximate", "tanh")}),
}


def _composite_batching_rule(args, dims, *, name, attributes, jaxpr, version,
                             **_):
  """vmap of qlite's rank-polymorphic composites (softmax over the last axis,
  gelu): move the batch axis to the front and emit the composite again."""
  if name not in _REBUILD and name != _BILINEAR or len(args) != 1:
    raise NotImplementedError(f"qlite: no batching rule for composite {name}")
  (x,), (d,) = args, dims
  x = jnp.moveaxis(x, d, 0) if d is not None else x
  if name == _BILINEAR:   # NHWC only: fold the vmapped axis into N
    y = _bilinear_composite(x.reshape((-1,) + x.shape[2:]))
    return [y.reshape(x.shape[:2] + y.shape[1:])], [0]
  fn, attrs = _REBUILD[name](dict(attributes))
  return [jax.lax.composite(fn, name=name)(x, **attrs)], [0]


def _softmax(x, axis=-1, where=None, **kwargs):
  ndim = getattr(x, "ndim", 0)
  last = axis in (-1, ndim - 1) if isinstance(axis, int) else (
      isinstance(axis, tuple) and len(axis) == 1 and axis[0] in (-1, ndim - 1))
  if where is not None or kwargs or not last or ndim == 0:
    return _ORIGINALS["softmax"](x, axis=axis, where=where, **kwargs)
  return jax.lax.composite(_softmax_last, name="odml.softmax")(x)


def _gelu(x, approximate: bool = True):
  return jax.lax.composite(
      lambda v, **_: _ORIGINALS["gelu"](v, approximate=approximate),
      name="aten.gelu.default")(x, approximate="tanh" if approximate
                                else "none")


def _leaky_relu(x, negative_slope=1e-2):
  # max(x, a*x) == leaky_relu for 0 <= a <= 1: MAXIMUM and MUL have int8
  # kernels, the where/compare form leaves GREATER_EQUAL in float.
  if isinstance(negative_slope, (int, float)) and 0.0 <= negative_slope <= 1.0:
    return jax.numpy.maximum(x, negative_slope * x)
  return _ORIGINALS["leaky_relu"](x, negative_slope)


def _pool_1d_as_2d(name):
  # LiteRT has no 1-D pooling: pool over (1, k) windows of x[:, None].
  def pool(inputs, window_shape, strides=None, padding="VALID", **kw):
    original = _ORIGINALS[name]
    if len(window_shape) != 1 or getattr(inputs, "ndim", 0) != 3:
      return original(inputs, window_shape, strides, padding, **kw)
    strides = (1,) + tuple(strides) if strides is not None else None
    if not isinstance(padding, str):
      padding = ((0, 0),) + tuple(tuple(p) for p in padding)
    y = original(inputs[:, None], (1,) + tuple(window_shape), strides,
                 padding, **kw)
    return y[:, 0]
  return pool


def _bilinear_2x(image):
  """jax's half-pixel bilinear 2x upsampling of an NHWC image, written as
  nearest 2x + edge pad + a fixed depthwise [1,2,1]x[1,2,1]/16 kernel
  (identical numbers: each output is 3/4 of its nearest input plus 1/4 of
  the next one towards it, per axis, clamped at the edges)."""
  n, h, w, c = image.shape
  up = _ORIGINALS["resize"](image, (n, 2 * h, 2 * w, c), "nearest")
  up = jnp.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  # The kernel is computed from an iota, not held as an array constant: a
  # composite passes its decomposition's array constants as extra leading
  # operands, and the converter's RESIZE_BILINEAR pattern matches only a
  # composite with the image as its one operand.
  k1 = 0.5 - 0.25 * jnp.abs(jax.lax.iota(image.dtype, 3) - 1.0)  # 1,2,1 / 4
  kernel = jnp.broadcast_to((k1[:, None] * k1[None, :])[:, :, None, None],
                            (3, 3, 1, c))
  return jax.lax.conv_general_dilated(
      up, kernel, (1, 1), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def _resize(image, shape, method, antialias=True, precision=None, **kw):
  """2x bilinear upsampling of NHWC images as an ``odml.upsample_bilinear2d``
  composite, which the LiteRT converter lowers to one RESIZE_BILINEAR
  (half_pixel_centers, the same numbers as jax's bilinear: both clamp at the
  edges). Its decomposition is :func:`_bilinear_2x`, so the numbers in JAX
  do not change. The converter reads the output size from the ``size``
  attribute (i64[2]); without it (e.g. ai-edge-torch's ``output``) it
  crashes. ``is_nchw_op`` is left out: NHWC is the default layout."""
  original = _ORIGINALS["resize"]
  args = dict(antialias=antialias, **kw)
  if precision is not None:
    args["precision"] = precision
  name = getattr(method, "name", str(method)).lower()
  shape = tuple(int(d) for d in shape)
  ok = (name in ("bilinear", "linear") and getattr(image, "ndim", 0) == 4
        and jnp.issubdtype(image.dtype, jnp.floating)
        and shape[0] == image.shape[0] and shape[3] == image.shape[3]
        and shape[1] == 2 * image.shape[1] and shape[2] == 2 * image.shape[2]
        and not _batched(image))
  if not ok:
    return original(image, shape, method, **args)
  return _bilinear_composite(image)


def _bilinear_composite(image):
  h, w = image.shape[1:3]
  return jax.lax.composite(lambda v, **_: _bilinear_2x(v), name=_BILINEAR)(
      image, size=np.array([2 * h, 2 * w], np.int64), align_corners=False)


_REPLACEMENTS = {"softmax": _softmax, "gelu": _gelu, "leaky_relu": _leaky_relu,
                 "avg_pool": _pool_1d_as_2d("avg_pool"),
                 "max_pool": _pool_1d_as_2d("max_pool"), "resize": _resize}


@contextlib.contextmanager
def traced_as_composites():
  """Within the block, softmax / gelu aliases in jax / flax modules trace as
  composites, and flax LayerNorm in qlite's int8-friendly form."""
  from jax._src.lax import lax as lax_internal
  composite_p = lax_internal.composite_p
  table = _batching.fancy_primitive_batchers
  saved_rule = table.get(composite_p)
  _batching.primitive_batchers[composite_p] = _composite_batching_rule
  patched = []
  for mod_name, mod in list(sys.modules.items()):
    if mod is None or not (mod_name.startswith("jax.") or mod_name == "jax"
                           or mod_name.startswith("flax")):
      continue
    for attr, original in _ORIGINALS.items():
      if getattr(mod, attr, None) is original:
        patched.append((mod, attr, original))
        setattr(mod, attr, _REPLACEMENTS[attr])
  try:
    with _layernorm.traced_in_int8_form():
      yield
  finally:
    for mod, attr, original in patched:
      setattr(mod, attr, original)
    if saved_rule is None:
      table.pop(composite_p, None)
    else:
      table[composite_p] = saved_rule
