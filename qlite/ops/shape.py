"""Data movement: ops LiteRT runs on int8 at their input's scale (RESHAPE,
TRANSPOSE, SLICE, GATHER, BROADCAST_TO, SPLIT...: no boundary of their own),
and CONCATENATION / PAD / REVERSE_V2, whose int8 kernels read every
activation input at the output's scale (the plan gives them and their inputs one shared range, so
the converter inserts no requantize)."""

from __future__ import annotations

from qlite.ops import base


class PassThrough(base.OpHandler):
  family = "shape"
  primitives = frozenset({
      "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose",
      "slice", "dynamic_slice", "gather", "copy", "copy_p", "split",
      "convert_element_type", "stop_gradient", "optimization_barrier",
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


HANDLERS = (PassThrough(), SameScaleJoin())
