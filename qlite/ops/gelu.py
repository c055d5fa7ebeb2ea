"""GELU: ``jax.nn.gelu`` (any alias, tanh or erf form) traces as an
``aten.gelu.default`` composite, which the converter lowers to one native
GELU (int8). Its decomposition is jax's gelu, so the numbers in JAX do not
change; the plan sees one compute op with a calibrated output."""

from __future__ import annotations

import jax

from qlite.ops import base
from qlite.ops._composite import rank_polymorphic
from qlite.trace import intercept


class Gelu(base.OpHandler):
  family = "gelu"
  primitives = frozenset({"aten.gelu.default"})
  litert_ops = ("GELU",)


def _decomposition(approximate: bool):
  return lambda v, **_: _original(v, approximate=approximate)


_COMPOSITES = {
    approx: rank_polymorphic("aten.gelu.default", _decomposition(approx),
                             approximate="tanh" if approx else "none")
    for approx in (True, False)}


def _gelu(original, x, approximate: bool = True):
  return _COMPOSITES[bool(approximate)](x)


_original = intercept.register(jax.nn.gelu, _gelu)

HANDLERS = (Gelu(),)
