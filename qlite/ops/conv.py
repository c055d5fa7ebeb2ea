"""Convolutions: ``conv_general_dilated`` -> CONV_2D / DEPTHWISE_CONV_2D.

The constant operand is a weight, quantized per output channel (symmetric,
narrow range). A following bias, BatchNorm's per-channel affine ops and a
relu / relu6 fuse into the kernel. A 1-D convolution is reshaped to 2-D by
the converter between the conv and what follows, so nothing fuses into it.
A conv with one input channel becomes DEPTHWISE_CONV_2D.
"""

from __future__ import annotations

from qlite.ops import base


class Conv(base.OpHandler):
  family = "conv"
  primitives = frozenset({"conv_general_dilated"})
  litert_ops = ("CONV_2D", "DEPTHWISE_CONV_2D")
  # per-channel affine ops after a conv (BatchNorm) fold into it
  fuses_per_channel_affine = True

  def role(self, node) -> str:
    return base.WEIGHTED

  def weight_axis(self, node, operand: int, ndim: int) -> int | None:
    if operand != 1:
      return None
    return int(node.params["dimension_numbers"].rhs_spec[0])

  def accepts_fusion(self, node) -> bool:
    return len(node.params["dimension_numbers"].lhs_spec) != 3   # not 1-D


HANDLERS = (Conv(),)
