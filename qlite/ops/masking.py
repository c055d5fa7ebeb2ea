"""Attention masks: ``jnp.where(mask, logits, fill)`` feeding a softmax.

Models mask attention logits with a huge negative fill (``jnp.finfo(f32)
.min`` in flax's attention, ``-1e9``, ``-1e4``, ``-inf``) before the
softmax. In int8 the fill cannot be represented next to the logits: a
calibrated range that includes it swallows the logits (all of them round to
one code). Here the select's output takes its range from the logits
(:data:`MASK_MARGIN` wider below their minimum, so every masked position is
at least that far below every kept one: its softmax weight is below
``exp(-MASK_MARGIN)`` and rounds to exactly 0 in the int8 output), is not
calibrated on its own, and the fill is clamped to that range's minimum.
Other selects (SELECT_V2) quantize their constant operands per tensor.
"""

from __future__ import annotations

import numpy as np

from qlite.ops import base

# A constant at or below this is a mask fill (finite or -inf).
FILL_AT_MOST = -1e3
# How far below the logits' minimum the fill lands (exp(-10) = 4.5e-5).
MASK_MARGIN = 10.0

_SHAPE_OPS = frozenset({"broadcast_in_dim", "reshape", "convert_element_type",
                        "squeeze", "expand_dims", "copy", "copy_p"})


def constant_value(ctx, a):
  """The value of operand ``a`` when it is a literal or a broadcast /
  reshape of one (or of a small known constant), else None."""
  graph = ctx.graph
  while isinstance(a, int):
    value = ctx.value_of(a)
    if value is not None:
      return value
    node = graph.producer.get(a)
    if node is None or node.name not in _SHAPE_OPS or len(node.inputs) != 1:
      return None
    a = node.inputs[0]
  return np.asarray(a.value)


def feeds_softmax(ctx, var: int) -> bool:
  from qlite.ops import softmax       # (imports qlite.ops.base too)
  graph = ctx.graph
  for _ in range(16):
    if softmax.is_exp_form_input(graph, var):  # a long softmax's exp form
      return True
    cons = graph.consumers.get(var, [])
    if len(cons) != 1 or var in graph.out_vars:
      return False
    node = cons[0]
    if node.name == "odml.softmax":
      return True
    if ctx.handler(node).role(node) != base.PASS_THROUGH:
      return False
    var = node.outputs[0]
  return False


def mask_bias_select(ctx, var):
  """The node that makes ``var`` an attention-mask bias, possibly reshaped /
  broadcast, or None: ``where(mask, 0, fill)`` with an input-dependent mask
  (BERT-style ``lax.select(mask > 0, 0, finfo.min)``), or ``m * fill`` with
  ``m`` computed from the mask (``(1 - mask.astype(f32)) * -1e9``)."""
  graph = ctx.graph
  for _ in range(16):
    node = graph.producer.get(var)
    if node is None:
      return None
    if node.name == "select_n" and len(node.inputs) == 3:
      break
    if node.name == "mul" and len(node.inputs) == 2:
      for i in (0, 1):
        c = constant_value(ctx, node.inputs[i])
        if c is not None and np.size(c) and np.issubdtype(c.dtype, np.floating) \
            and np.all(c <= FILL_AT_MOST) and graph.is_activation(
                node.inputs[1 - i]):
          return node
      return None
    if ctx.handler(node).role(node) != base.PASS_THROUGH:
      return None
    acts = [a for a in node.inputs if graph.is_activation(a)]
    if len(acts) != 1:
      return None
    var = acts[0]
  else:
    return None
  if constant_value(ctx, node.inputs[0]) is not None:
    return None                       # a constant mask: folded, handled as such
  consts = [constant_value(ctx, a) for a in node.inputs[1:]]
  if any(c is None or np.size(c) == 0 or not np.issubdtype(c.dtype,
                                                           np.floating)
         for c in consts):
    return None
  fills = [bool(np.all(c <= FILL_AT_MOST)) for c in consts]
  zeros = [bool(np.all(c == 0)) for c in consts]
  if (fills[0] and zeros[1]) or (fills[1] and zeros[0]):
    return node
  return None


class Select(base.OpHandler):
  family = "select"
  primitives = frozenset({"select_n"})
  litert_ops = ("SELECT_V2",)
  notes = ("a huge negative fill before a softmax (attention mask) takes the "
           "logits' range and is clamped to its minimum")
  mask_margin = MASK_MARGIN

  def masked_fill(self, node, ctx) -> tuple[int, int] | None:
    """``(fill operand, logits operand)`` when ``node`` is a two-way select
    of an activation and a mask fill that feeds a softmax, else None."""
    if len(node.inputs) != 3:
      return None
    for fill, value in ((1, 2), (2, 1)):
      c = constant_value(ctx, node.inputs[fill])
      if c is None or np.size(c) == 0 or not ctx.graph.is_activation(
          node.inputs[value]):
        continue
      if np.issubdtype(c.dtype, np.floating) and np.all(c <= FILL_AT_MOST) \
          and feeds_softmax(ctx, node.outputs[0]):
        return fill, value
    return None

  def quantized_constants(self, node, ctx):
    return [(i, False) for i in range(len(node.inputs))
            if ctx.is_const_operand(node, i)]

  def reads_constant_values(self) -> bool:
    return True


HANDLERS = (Select(),)
