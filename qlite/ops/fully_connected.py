"""Matrix products: ``dot_general`` -> FULLY_CONNECTED (constant weight) or
BATCH_MATMUL (two activations).

A constant operand is a weight, quantized per output channel when it has one
free (non-contracting, non-batch) axis, else per tensor. A bias added right
after it and a relu / relu6 fuse into FULLY_CONNECTED.
"""

from __future__ import annotations

from qlite.ops import base


class FullyConnected(base.OpHandler):
  family = "fully_connected"
  primitives = frozenset({"dot_general"})
  litert_ops = ("FULLY_CONNECTED", "BATCH_MATMUL")
  fuses_per_channel_affine = False

  def role(self, node) -> str:
    return base.WEIGHTED

  def weight_axis(self, node, operand: int, ndim: int) -> int | None:
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    contract, batch = (lc, lb) if operand == 0 else (rc, rb)
    free = [d for d in range(ndim) if d not in contract and d not in batch]
    return free[0] if len(free) == 1 else None

  def accepts_fusion(self, node) -> bool:
    return True


HANDLERS = (FullyConnected(),)
