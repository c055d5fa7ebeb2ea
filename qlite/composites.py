"""Trace well-known jax functions as single named ops.

While a model is traced, ``jax.nn.softmax`` and ``jax.nn.gelu`` (and every
module attribute that aliases them, e.g. ``flax.linen.gelu``) are replaced by
``jax.lax.composite`` ops whose names the LiteRT converter lowers to native
int8 kernels (``odml.softmax`` -> SOFTMAX, ``aten.gelu.default`` -> GELU).
Their decomposition is the original function, so the numbers in JAX do not
change; the plan sees one op instead of a dozen float primitives.
``jax.nn.leaky_relu`` traces as the identical ``max(x, slope * x)``.
"""

from __future__ import annotations

import contextlib
import sys

import jax

_ORIGINALS = {"softmax": jax.nn.softmax, "gelu": jax.nn.gelu,
              "leaky_relu": jax.nn.leaky_relu}


def _softmax(x, axis=-1, where=None, **kwargs):
  ndim = getattr(x, "ndim", 0)
  last = axis in (-1, ndim - 1) if isinstance(axis, int) else (
      isinstance(axis, tuple) and len(axis) == 1 and axis[0] in (-1, ndim - 1))
  if where is not None or kwargs or not last or ndim == 0:
    return _ORIGINALS["softmax"](x, axis=axis, where=where, **kwargs)
  return jax.lax.composite(lambda v: _ORIGINALS["softmax"](v, axis=-1),
                           name="odml.softmax")(x)


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


_REPLACEMENTS = {"softmax": _softmax, "gelu": _gelu, "leaky_relu": _leaky_relu}


@contextlib.contextmanager
def traced_as_composites():
  """Within the block, softmax / gelu aliases in jax / flax modules trace as
  composites."""
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
    yield
  finally:
    for mod, attr, original in patched:
      setattr(mod, attr, original)
