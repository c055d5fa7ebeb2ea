"""Reductions and pools: MEAN, SUM, AVERAGE_POOL_2D, MAX_POOL_2D, REDUCE_MAX.

* A sum followed by a multiplication / division by a constant is one LiteRT
  op (``jnp.mean`` -> MEAN, ``nn.avg_pool`` -> AVERAGE_POOL_2D): no boundary
  in between, the constant left to the converter.
* AVERAGE_POOL_2D's int8 kernel reads its input at the output's scale (and
  so does a relu / relu6 it fuses): they share one range; it rounds the code
  sum / count half away from zero, and so does the fake-quant model.
* Max pools and max / min reductions run at their input's scale.
* LiteRT has no 1-D pooling: ``flax.linen.avg_pool`` / ``max_pool`` over one
  spatial axis trace as 2-D pools over ``(1, k)`` windows.
"""

from __future__ import annotations

from flax import linen

from qlite.ops import base
from qlite.trace import intercept


class MaxReductions(base.OpHandler):
  family = "max_pool_reduce_max"
  primitives = frozenset({"reduce_max", "reduce_min", "reduce_window_max",
                          "reduce_window_min"})
  litert_ops = ("MAX_POOL_2D", "REDUCE_MAX", "REDUCE_MIN")

  def role(self, node) -> str:
    return base.PASS_THROUGH


class Sum(base.OpHandler):
  family = "mean_sum"
  primitives = frozenset({"reduce_sum"})
  litert_ops = ("MEAN", "SUM")

  def scale_fuses_into(self, node, consumer, ctx) -> bool:
    return ctx.handler(consumer).scales_by_constant(consumer, ctx)


class WindowSum(Sum):
  family = "average_pool"
  primitives = frozenset({"reduce_window_sum"})
  litert_ops = ("AVERAGE_POOL_2D",)

  def same_scale_output(self, node, ctx, scaled_by):
    if node.index not in scaled_by:
      return None                       # a plain windowed sum, not a pool
    out = scaled_by[node.index].outputs[0]
    return [out] + _fused_clamp_outputs(ctx, out)

  def output_rounding(self, summed_node) -> str | None:
    return "half_away"


def _fused_clamp_outputs(ctx, var: int) -> list[int]:
  """Outputs of the chain of relu / relu6 clamps that is ``var``'s only
  consumer, in order (LiteRT fuses them into AVERAGE_POOL_2D)."""
  graph = ctx.graph
  outs = []
  while var not in graph.out_vars:
    cons = graph.consumers.get(var, [])
    if len(cons) != 1:
      break
    node = cons[0]
    if not ctx.handler(node).activation_kind(node, ctx):
      break
    var = node.outputs[0]
    outs.append(var)
  return outs


def _pool_1d_as_2d(original, inputs, window_shape, strides=None,
                   padding="VALID", **kw):
  if len(window_shape) != 1 or getattr(inputs, "ndim", 0) != 3:
    return original(inputs, window_shape, strides, padding, **kw)
  strides = (1,) + tuple(strides) if strides is not None else None
  if not isinstance(padding, str):
    padding = ((0, 0),) + tuple(tuple(p) for p in padding)
  y = original(inputs[:, None], (1,) + tuple(window_shape), strides,
               padding, **kw)
  return y[:, 0]


intercept.register(linen.avg_pool, _pool_1d_as_2d)
intercept.register(linen.max_pool, _pool_1d_as_2d)

HANDLERS = (MaxReductions(), Sum(), WindowSum())
