"""Elementwise arithmetic: ADD, SUB, MUL, DIV (as MUL), POW, SELECT and the
comparisons.

* A constant operand gets a per-tensor boundary: the converter leaves an op
  in float when one of its operands is a float constant.
* Division by a constant runs as a multiplication by its quantized
  reciprocal (LiteRT's int8 DIV is unreliable).
* After a conv / fully-connected: an ``add`` / ``sub`` of a constant straight
  after it is its bias; after a conv, per-channel ``add`` / ``sub`` / ``mul``
  / ``div`` (BatchNorm's shift and scale) fold into it too.
* ``mul`` / ``div`` by a constant after a sum make one MEAN / AVERAGE_POOL_2D
  (see :mod:`qlite.ops.reductions`).
* Comparisons have a bool output but their constant operands are quantized
  so they run on int8 inputs.
"""

from __future__ import annotations

import jax
import numpy as np

from qlite.ops import base, masking

BIAS = frozenset({"add", "sub"})
AFFINE = frozenset({"add", "sub", "mul", "div"})
COMPARE = frozenset({"ge", "gt", "le", "lt", "eq", "ne"})


def _const_operands(node, ctx) -> list[int]:
  return [i for i in range(len(node.inputs)) if ctx.is_const_operand(node, i)]


def _per_channel_const(graph, node, const_pos: int, act) -> bool:
  """True when the constant operand broadcasts along the last (channel)
  axis only: a scalar or shape (..., 1, C)."""
  a = node.inputs[const_pos]
  if not isinstance(a, int):
    return np.size(a.value) == 1
  cshape = tuple(graph.avals[a].shape)
  ashape = tuple(graph.avals[act].shape)
  if int(np.prod(cshape)) == 1:
    return True
  if not cshape or cshape[-1] != ashape[-1]:
    return False
  if node.name in ("sub", "div") and const_pos == 0:   # c - x, c / x: no
    return False
  return all(d == 1 for d in cshape[:-1])


class Arithmetic(base.OpHandler):
  family = "elementwise"
  primitives = AFFINE
  litert_ops = ("ADD", "SUB", "MUL")
  notes = ("div by a constant runs as MUL by its quantized reciprocal; an "
           "additive attention mask is clipped to the logits' range; r + r "
           "of a reshaped r runs as MUL by 2")
  mask_margin = 10.0
  # A relu / relu6 reading the op's output alone fuses into LiteRT's ADD /
  # SUB / MUL kernel, which requantizes straight to the relu's output scale:
  # the op's own boundary is never rounded (qlite.quant.plan._rounding).
  fuses_activation = True

  def chain_fusion(self, node, ctx, chain, direct, activated):
    graph = ctx.graph
    static_float = [i for i, a in enumerate(node.inputs)
                    if isinstance(a, int) and not graph.is_activation(a)
                    and graph.is_float(a)]
    if not static_float or activated or self.masked_fill(node, ctx):
      return None
    if node.name in BIAS and direct:
      return "affine"
    acts = ctx.activation_inputs(node)
    if getattr(ctx.handler(chain), "fuses_per_channel_affine", False) and \
        _per_channel_const(graph, node, static_float[0],
                           node.inputs[acts[0]]):
      return "affine"
    return None

  def quantized_constants(self, node, ctx):
    return [(i, node.name == "div" and i == 1)
            for i in _const_operands(node, ctx)]

  def masked_fill(self, node, ctx):
    """An additive attention mask: ``logits + m`` with a constant ``m`` of
    zeros and huge negatives, feeding a softmax (qlite.ops.masking)."""
    if node.name != "add":
      return None
    for fill, value in ((0, 1), (1, 0)):
      if ctx.graph.is_activation(node.inputs[fill]) and ctx.graph.is_activation(
          node.inputs[value]) and masking.mask_bias_select(
              ctx, node.inputs[fill]) is not None and masking.feeds_softmax(
                  ctx, node.outputs[0]):
        return fill, value          # logits + where(mask, 0, fill)
      c = masking.constant_value(ctx, node.inputs[fill])
      if c is None or np.size(c) == 0 or not ctx.graph.is_activation(
          node.inputs[value]) or not np.issubdtype(c.dtype, np.floating):
        continue
      if np.min(c) <= masking.FILL_AT_MOST and masking.feeds_softmax(
          ctx, node.outputs[0]):
        return fill, value
    return None

  def reads_constant_values(self) -> bool:
    return True          # additive masks (masked_fill)

  def virtual_constants(self, node, ctx) -> tuple:
    """``r + r`` of a reshaped value runs as ``r * 2``: litert-converter
    moves a RESHAPE after an ADD of it with itself, and a second self-add
    of that sum then fails its same-scale check ('tfl.reshape' op
    quantization parameters violate the same scale constraint, found by
    the fuzzer); it leaves a MUL by a constant alone."""
    a = node.inputs[0]
    if node.name == "add" and len(node.inputs) == 2 and \
        node.inputs[1] == a and ctx.graph.is_activation(a) and \
        getattr(ctx.graph.producer.get(a), "name", None) == "reshape":
      return (2.0,)
    return ()

  def lower(self, node, invals, consts):
    return [jax.lax.mul_p.bind(invals[0], consts[0])]

  def scales_by_constant(self, node, ctx) -> bool:
    return node.name in ("div", "mul") and any(
        ctx.is_const_operand(node, i) for i in range(2))


class OtherBinary(base.OpHandler):
  family = "elementwise_other"
  primitives = frozenset({"pow", "atan2", "rem"})
  litert_ops = ("POW",)

  def quantized_constants(self, node, ctx):
    return [(i, False) for i in _const_operands(node, ctx)]


class Compare(base.OpHandler):
  family = "compare"
  primitives = COMPARE
  litert_ops = ("GREATER_EQUAL", "GREATER", "LESS_EQUAL", "LESS", "EQUAL",
                "NOT_EQUAL")

  def quantizes_without_float_output(self, node) -> bool:
    return True

  def quantized_constants(self, node, ctx):
    return [(i, False) for i in _const_operands(node, ctx)]


class Negate(base.OpHandler):
  family = "negate"
  primitives = frozenset({"neg"})
  litert_ops = ("MUL",)
  notes = "NEG has no int8 kernel: runs as MUL by a quantized -1"

  def virtual_constants(self, node, ctx) -> tuple:
    return (-1.0,)

  def lower(self, node, invals, consts):
    return [jax.lax.mul_p.bind(invals[0], consts[0])]


HANDLERS = (Arithmetic(), OtherBinary(), Compare(), Negate())
