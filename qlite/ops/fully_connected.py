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

A product of two activations (attention's ``q @ k^T`` and ``p @ v``)
quantizes its right-hand side symmetric (zero point 0): LiteRT's XNNPACK
delegate runs an int8 BATCH_MATMUL only then (otherwise the builtin kernel
runs it, 25x slower at ViT-S/16's 6x196x196x64: 1.79 vs 0.07 ms), and a
FULLY_CONNECTED reading an activation as its weight needs a zero-point-0
weight as well. The left-hand side keeps its asymmetric range; when the
right-hand side is a softmax's probabilities (fixed range [0, 1], e.g.
``jnp.einsum("bhqk,bkhd->bqhd", p, v)``, which jax computes as
``dot_general(v, p)``), the product is computed with its operands swapped
and transposed back, so that ``v`` is the right-hand side.
"""

from __future__ import annotations

import jax

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

  def zero_point_operands(self, node, ctx) -> tuple[int, ...]:
    return (1,) if len(ctx.activation_inputs(node)) == 2 else ()

  def swap_operand(self, node, i: int) -> int | None:
    return 1 - i

  def lower_swapped(self, node, invals: list) -> list:
    """``dot_general(rhs, lhs)`` transposed to ``dot_general(lhs, rhs)``'s
    layout (batch, lhs free, rhs free): the same products and sums."""
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    lhs, rhs = invals
    params = dict(node.params, dimension_numbers=((rc, lc), (rb, lb)))
    out = jax.lax.dot_general_p.bind(rhs, lhs, **params)
    nb = len(lb)
    n_rhs_free = rhs.ndim - len(rc) - len(rb)
    n_lhs_free = lhs.ndim - len(lc) - len(lb)
    perm = (tuple(range(nb)) +
            tuple(range(nb + n_rhs_free, nb + n_rhs_free + n_lhs_free)) +
            tuple(range(nb, nb + n_rhs_free)))
    return [jax.lax.transpose(out, perm)]


HANDLERS = (FullyConnected(),)
