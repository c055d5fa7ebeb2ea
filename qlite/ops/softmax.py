"""SOFTMAX, LOGISTIC and TANH: int8 kernels with a fixed output scale.

``jax.nn.softmax`` over the last axis (any alias: ``nn.softmax``,
``from jax.nn import softmax``, a partial) traces as an ``odml.softmax``
composite, which the converter lowers to one SOFTMAX; other axes, ``where=``
masks and 0-d inputs run jax's code. The outputs get LiteRT's fixed ranges:
softmax / logistic scale 1/256 zero point -128, tanh scale 1/128 zero point 0.
"""

from __future__ import annotations

from qlite.ops import base
from qlite.ops._composite import rank_polymorphic
from qlite.trace import intercept

import jax

# (lo, hi) so that asymmetric int8 gives LiteRT's required scale / zero point.
FIXED_RANGES = {
    "odml.softmax": (0.0, 255.0 / 256.0),
    "logistic": (0.0, 255.0 / 256.0),
    "tanh": (-1.0, 127.0 / 128.0),
}


# The same at int16 (LiteRT's 16x8 kernels: symmetric, zero point 0, output
# scale 1/32768): symmetric int16 of (lo, hi) has scale max(|lo|, |hi|) /
# 32767.
FIXED_RANGES_INT16 = {
    "odml.softmax": (0.0, 32767.0 / 32768.0),
    "logistic": (0.0, 32767.0 / 32768.0),
    "tanh": (-32767.0 / 32768.0, 32767.0 / 32768.0),
}


class FixedRange(base.OpHandler):
  family = "softmax_logistic_tanh"
  primitives = frozenset(FIXED_RANGES)
  litert_ops = ("SOFTMAX", "LOGISTIC", "TANH")

  def fixed_range(self, name: str):
    return FIXED_RANGES.get(name)


def _softmax_last(v):
  return _original(v, axis=-1)


_softmax_composite = rank_polymorphic("odml.softmax", _softmax_last)


def _softmax(original, x, axis=-1, where=None, **kwargs):
  ndim = getattr(x, "ndim", 0)
  last = axis in (-1, ndim - 1) if isinstance(axis, int) else (
      isinstance(axis, tuple) and len(axis) == 1 and axis[0] in (-1, ndim - 1))
  if where is not None or kwargs or not last or ndim == 0:
    return original(x, axis=axis, where=where, **kwargs)
  return _softmax_composite(x)


_original = intercept.register(jax.nn.softmax, _softmax)

HANDLERS = (FixedRange(),)
