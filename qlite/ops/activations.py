"""Clamps and simple activations: MAXIMUM / MINIMUM, relu / relu6 fused into
the conv / fully-connected before them, ``jax.nn.leaky_relu`` traced as
``max(x, a * x)``, and elu / celu / selu / softplus / log_sigmoid / mish
traced in forms without a float comparison.

* ``max(x, 0)``, ``clamp(0, x, 6)`` and ``min(max(x, 0), 6)`` after a conv /
  fully-connected fuse into it as RELU / RELU6; their 0 and 6 stay as they
  are (the converter matches them).
* MAXIMUM / MINIMUM of two activations read both at the output's scale.
* Other constants they read get a per-tensor boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qlite.ops import base
from qlite.trace import intercept


def relu_kind(node, static_value) -> str | None:
  """'relu' for max(x, 0), 'min6' for min(x, 6), 'relu6' for clamp(0, x, 6);
  None otherwise. ``static_value(i)`` returns operand i's constant or None."""
  if node.name == "max":
    for i in (0, 1):
      if base.is_zero(static_value(i)):
        return "relu"
  if node.name == "min":
    for i in (0, 1):
      if base.all_equal(static_value(i), 6):
        return "min6"
  if node.name == "clamp":
    lo, hi = static_value(0), static_value(2)
    if base.is_zero(lo) and hi is not None and np.all(np.asarray(hi) == 6):
      return "relu6"
  return None


class Clamp(base.OpHandler):
  family = "clamp"
  primitives = frozenset({"max", "min", "clamp"})
  litert_ops = ("MAXIMUM", "MINIMUM", "RELU", "RELU6")

  def activation_kind(self, node, ctx):
    return relu_kind(node, lambda i: ctx.static_value(node, i))

  def reads_constant_values(self) -> bool:
    return True

  def chain_fusion(self, node, ctx, chain, direct, activated):
    kind = self.activation_kind(node, ctx)
    if kind in ("relu", "relu6"):
      return "activation"
    if kind == "min6":
      prev = ctx.graph.producer.get(node.inputs[ctx.activation_inputs(node)[0]])
      if prev is not None and prev.name == "max":
        return "activation"
    return None

  def quantized_constants(self, node, ctx):
    if self.activation_kind(node, ctx):
      return []
    return [(i, False) for i in range(len(node.inputs))
            if ctx.is_const_operand(node, i)]

  def same_scale_output(self, node, ctx, scaled_by):
    if node.name == "clamp":
      return None
    acts = ctx.activation_inputs(node)
    if len(acts) >= 2:
      return [node.outputs[0]]
    if len(acts) == 1 and not self.activation_kind(node, ctx):
      # max / min with a constant of a tensor other ops read too: LiteRT's
      # MAXIMUM / MINIMUM read their input at the output's scale, and the
      # converter requantizes the shared tensor once and hands that copy to
      # the other readers as well (max(y, 0) + 0.5 * min(y, 0) of a
      # transposed Dense: the relu read [min, 0] and lost the positive
      # half). One shared range makes no requantize.
      src = node.inputs[acts[0]]
      if len(ctx.graph.consumers.get(src, [])) > 1:
        return [node.outputs[0]]
    return None                   # relu clamps, max / min with a constant


def _leaky_relu(original, x, negative_slope=1e-2):
  # The where / compare form leaves GREATER_EQUAL in float. max(x, a*x) ==
  # leaky_relu for 0 <= a <= 1 (MAXIMUM, MUL: int8 kernels). A slope passed
  # explicitly reaches jax.nn.leaky_relu's jitted body as a tracer of
  # unknown value: max(x, 0) + a * min(x, 0) holds for any slope.
  if isinstance(negative_slope, (int, float)) and 0.0 <= negative_slope <= 1.0:
    return jax.numpy.maximum(x, negative_slope * x)
  if getattr(x, "dtype", None) is not None and \
      jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
    zero = jax.numpy.zeros((), x.dtype)
    return jax.numpy.maximum(x, zero) + negative_slope * jax.numpy.minimum(
        x, zero)
  return original(x, negative_slope)


intercept.register(jax.nn.leaky_relu, _leaky_relu)


# jax's elu / celu / selu / softplus / log_sigmoid / mish select between two
# branches with a float comparison (GREATER, NOT_EQUAL stay float); these
# forms compute the same function from MAXIMUM / MINIMUM / EXP / LOG / ABS /
# MUL / ADD, which all have int8 kernels.
def _float(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _elu(original, x, alpha=1.0):
  if not _float(x):
    return original(x, alpha)
  zero = jnp.zeros((), x.dtype)
  return jnp.maximum(x, zero) + alpha * (jnp.exp(jnp.minimum(x, zero)) - 1.0)


def _celu(original, x, alpha=1.0):
  if not _float(x):
    return original(x, alpha)
  zero = jnp.zeros((), x.dtype)
  return jnp.maximum(x, zero) + alpha * (
      jnp.exp(jnp.minimum(x, zero) / alpha) - 1.0)


_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


def _selu(original, x):
  if not _float(x):
    return original(x)
  return _SELU_SCALE * _elu(None, x, _SELU_ALPHA)


def _softplus(original, x):
  if not _float(x):
    return original(x)
  # (NEG has no int8 kernel: multiply by -1)
  return jnp.maximum(x, jnp.zeros((), x.dtype)) + jnp.log(
      1.0 + jnp.exp(jnp.abs(x) * -1.0))


def _log_sigmoid(original, x):
  if not _float(x):
    return original(x)
  return _softplus(None, x * -1.0) * -1.0


def _mish(original, x):
  if not _float(x):
    return original(x)
  return x * jnp.tanh(_softplus(None, x))


for _fn, _replacement in ((jax.nn.elu, _elu), (jax.nn.celu, _celu),
                          (jax.nn.selu, _selu), (jax.nn.softplus, _softplus),
                          (jax.nn.log_sigmoid, _log_sigmoid),
                          (jax.nn.mish, _mish)):
  intercept.register(_fn, _replacement)
del _fn, _replacement

HANDLERS = (Clamp(),)
