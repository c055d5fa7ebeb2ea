"""Data movement: ops LiteRT runs on int8 at their input's scale (RESHAPE,
TRANSPOSE, SLICE, GATHER, BROADCAST_TO, SPLIT...: no boundary of their own),
and CONCATENATION / PAD / REVERSE_V2, whose int8 kernels read every
activation input at the output's scale (the plan gives them and their inputs one shared range, so
the converter inserts no requantize)."""

from __future__ import annotations

import jax
import numpy as np

from qlite.ops import base


class PassThrough(base.OpHandler):
  family = "shape"
  primitives = frozenset({
      "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose",
      "slice", "dynamic_slice", "gather", "copy", "copy_p", "split",
      "stop_gradient", "optimization_barrier",
  })
  litert_ops = ("RESHAPE", "TRANSPOSE", "SLICE", "STRIDED_SLICE", "GATHER",
                "BROADCAST_TO", "SPLIT")

  def role(self, node) -> str:
    return base.PASS_THROUGH


class SameScaleJoin(base.OpHandler):
  family = "concat_pad"
  # REVERSE_V2 (jnp.flip, nn.RNN(reverse=True)) stays float unless its
  # output has a boundary: it gets one, at its input's scale.
  primitives = frozenset({"concatenate", "pad", "rev"})
  litert_ops = ("CONCATENATION", "PAD", "REVERSE_V2")

  def same_scale_output(self, node, ctx, scaled_by):
    return [node.outputs[0]]


class Cast(PassThrough):
  """``convert_element_type``: float -> float passes its input's scale; a
  bool -> float cast of a computed value (``mask.astype(jnp.float32)``) has
  no int8 form (CAST to float), so it runs as ``where(b, 1, 0)``: SELECT of
  two quantized constants. An int -> float cast of a computed integer (and
  the float ops after it) is a table lookup (:mod:`qlite.ops.int_lookup`)."""
  family = "cast"
  primitives = frozenset({"convert_element_type"})
  litert_ops = ("SELECT_V2", "GATHER")
  notes = ("bool -> float: a SELECT of two constants; int -> float of a "
           "computed integer: a lookup table (int_lookup), exact at scale 1 "
           "when the integer's range spans < 256")

  def virtual_constants(self, node, ctx) -> tuple:
    graph = ctx.graph
    a, out = node.inputs[0], node.outputs[0]
    if isinstance(a, int) and graph.avals[a].dtype == np.bool_ and \
        graph.is_activation(out):
      return (0.0, 1.0)
    return ()

  def lower(self, node, invals, consts):
    b = invals[0]
    zero = jax.numpy.broadcast_to(consts[0], b.shape)
    one = jax.numpy.broadcast_to(consts[1], b.shape)
    return [jax.numpy.where(b, one, zero).astype(node.params["new_dtype"])]


HANDLERS = (PassThrough(), SameScaleJoin(), Cast())
