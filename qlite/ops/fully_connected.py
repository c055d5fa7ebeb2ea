"""Matrix products: ``dot_general`` -> FULLY_CONNECTED (constant weight) or
BATCH_MATMUL (two activations, or a constant weight with a batch axis).

A constant operand is a weight, quantized per output channel when it has one
free (non-contracting, non-batch) axis, else per tensor. A bias added right
after it and a relu / relu6 fuse into FULLY_CONNECTED.

A weight with a batch axis (``dot_general`` batch dimensions: ``nn.Einsum``
``"bgi,gio->bgo"``, ``nn.vmap(nn.Dense, variable_axes={"params": 0})``,
expert stacks ``"eti,eio->eto"``) becomes the constant operand of
BATCH_MATMUL, whose int8 kernel reads one scale for its right-hand side:
with per-channel scales LiteRT returned all zeros (litert-converter 0.5.0,
ai-edge-litert 2.3.0), with one scale it matches the fake-quant model
exactly. Such weights are therefore quantized per tensor, and nothing fuses
into the product (BATCH_MATMUL has no bias or activation): a following bias
add is its own int8 ADD.
"""

from __future__ import annotations

from qlite.ops import base


def _has_batch_dims(node) -> bool:
  (_, _), (lb, rb) = node.params["dimension_numbers"]
  return bool(len(lb) or len(rb))


class FullyConnected(base.OpHandler):
  family = "fully_connected"
  primitives = frozenset({"dot_general"})
  litert_ops = ("FULLY_CONNECTED", "BATCH_MATMUL")
  fuses_per_channel_affine = False
  notes = ("per tensor when the weight has a batch axis (BATCH_MATMUL "
           "reads one scale)")

  def role(self, node) -> str:
    return base.WEIGHTED

  def weight_axis(self, node, operand: int, ndim: int) -> int | None:
    if _has_batch_dims(node):
      return None
    (lc, rc), _ = node.params["dimension_numbers"]
    contract = lc if operand == 0 else rc
    free = [d for d in range(ndim) if d not in contract]
    return free[0] if len(free) == 1 else None

  def accepts_fusion(self, node) -> bool:
    return not _has_batch_dims(node)


HANDLERS = (FullyConnected(),)
