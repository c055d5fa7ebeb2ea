"""SOFTMAX, LOGISTIC and TANH: int8 kernels with a fixed output scale.

``jax.nn.softmax`` over the last axis (any alias: ``nn.softmax``,
``from jax.nn import softmax``, a partial) traces as an ``odml.softmax``
composite, which the converter lowers to one SOFTMAX; other axes, ``where=``
masks and 0-d inputs run jax's code. The outputs get LiteRT's fixed ranges:
softmax / logistic scale 1/256 zero point -128, tanh scale 1/128 zero point 0.

A softmax over a long axis (more than ``SOFTMAX_EXP_ABOVE`` entries)
instead traces as ``e * (1 / sum(e))`` with ``e = exp(x - max(x))``
(REDUCE_MAX, SUB, EXP, SUM, RSQRT, MUL, all int8): its probabilities then
get a calibrated output scale instead of SOFTMAX's fixed 1/256, which is
coarser than the mean probability ``1 / n`` of an ``n``-long row.
"""

from __future__ import annotations

from qlite.ops import base
from qlite.ops._composite import rank_polymorphic
from qlite.trace import intercept

import jax
import jax.numpy as jnp
from jax import lax

# Rows longer than this use the exp / sum form (module docstring): there the
# mean probability 1/n is under 2 steps of the int8 SOFTMAX kernel's fixed
# output scale 1/256. Measured (LiteRT int8 vs float, held-out data,
# `bench/ptq_algorithms.py --softmax-forms`, bench/RESULTS_ptq.md): ViT-S/16
# (196 tokens) 23.8 -> 26.5 dB, a BERT-style encoder on 256 tokens 9.9 ->
# 10.0 dB; on rows of 4 to 128 entries (zoo / bench transformers, causal
# LMs, MoE router, BERT-style encoders, ViT on smaller images) it wins or
# loses by model (-0.5 to +1.1 dB), so they keep SOFTMAX.
SOFTMAX_EXP_ABOVE = 128

# (lo, hi) so that asymmetric int8 gives LiteRT's required scale / zero point.
FIXED_RANGES = {
    "odml.softmax": (0.0, 255.0 / 256.0),
    "logistic": (0.0, 255.0 / 256.0),
    "tanh": (-1.0, 127.0 / 128.0),
}


# The same at int16 (LiteRT's 16x8 kernels: symmetric, zero point 0, output
# scale 1/32768): symmetric int16 of (lo, hi) has scale max(|lo|, |hi|) /
# 32767.
FIXED_RANGES_INT16 = {
    "odml.softmax": (0.0, 32767.0 / 32768.0),
    "logistic": (0.0, 32767.0 / 32768.0),
    "tanh": (-32767.0 / 32768.0, 32767.0 / 32768.0),
}


class FixedRange(base.OpHandler):
  family = "softmax_logistic_tanh"
  primitives = frozenset(FIXED_RANGES)
  litert_ops = ("SOFTMAX", "LOGISTIC", "TANH")

  def fixed_range(self, name: str):
    return FIXED_RANGES.get(name)


def _softmax_last(v):
  return _original(v, axis=-1)


_softmax_composite = rank_polymorphic("odml.softmax", _softmax_last)


# The exp / sum form clamps ``x - max(x)`` at -EXP_FLOOR: the weights it
# changes are below exp(-16) = 1.1e-7 of the largest (float softmax within
# 1e-7 * n), far below one step of the int8 ``exp`` output (1/255), and an
# attention mask's fill (-1e9, -inf) stays out of the int8 ranges after the
# select (qlite.ops.masking gives the select the logits' range).
EXP_FLOOR = 16.0


def softmax_exp(x):
  """Softmax over the last axis as ``e * (1 / sum(e))``, ``e = exp(max(x,
  m - EXP_FLOOR) - m)``, ``m = max(x)``; the reciprocal is ``rsqrt(sum) **
  2`` (one int8 RSQRT on the row sums: with ``e / sum(e)`` the converter
  fuses the pattern back into one SOFTMAX, which then refuses the
  calibrated output scale, "output->params.scale not near 1.f / 256")."""
  m = jnp.max(x, axis=-1, keepdims=True)
  e = jnp.exp(jnp.maximum(x, m - EXP_FLOOR) - m)
  r = lax.rsqrt(jnp.sum(e, axis=-1, keepdims=True))
  return e * (r * r)


def is_exp_form_input(graph, var) -> bool:
  """True when ``var`` is the input of a :func:`softmax_exp`: read by one
  REDUCE_MAX and by one MAXIMUM with ``max - EXP_FLOOR`` (qlite.ops.masking:
  an attention mask before it)."""
  cons = graph.consumers.get(var, [])
  if len(cons) != 2 or var in graph.out_vars:
    return False
  red = [n for n in cons if n.name == "reduce_max"]
  mx = [n for n in cons if n.name == "max"]
  if len(red) != 1 or len(mx) != 1 or len(mx[0].inputs) != 2:
    return False
  other = [a for a in mx[0].inputs if a != var]
  target = red[0].outputs[0]
  a = other[0] if len(other) == 1 else None
  for _ in range(4):                  # sub(broadcast / reshape(max), floor)
    node = graph.producer.get(a) if isinstance(a, int) else None
    if node is None:
      return False
    if target in node.inputs:
      return True
    acts = [i for i in node.inputs if isinstance(i, int)
            and graph.is_activation(i)]
    if len(acts) != 1:
      return False
    a = acts[0]
  return False


_SHAPE_OPS = frozenset({"broadcast_in_dim", "reshape", "squeeze",
                        "expand_dims"})


def _through_shape_ops(graph, var):
  node = graph.producer.get(var) if isinstance(var, int) else None
  while node is not None and node.name in _SHAPE_OPS and node.inputs:
    node = graph.producer.get(node.inputs[0]) if isinstance(
        node.inputs[0], int) else None
  return node


def is_exp_form_output(graph, var) -> bool:
  """True when ``var`` is the probabilities of a :func:`softmax_exp`
  (``e * (r * r)``, ``r = rsqrt(sum(e))``, ``e = exp(...)``): non-negative,
  so an int8 matmul reading them at zero point 0 would waste half its
  grid (qlite.quant.plan swaps the operands, as for a SOFTMAX)."""
  node = graph.producer.get(var) if isinstance(var, int) else None
  if node is None or node.name != "mul" or len(node.inputs) != 2:
    return False
  for e, r2 in (node.inputs, node.inputs[::-1]):
    exp = _through_shape_ops(graph, e)
    sq = _through_shape_ops(graph, r2)
    if exp is None or exp.name != "exp" or sq is None or sq.name != "mul" \
        or sq.inputs[0] != sq.inputs[1]:
      continue
    rs = _through_shape_ops(graph, sq.inputs[0])
    if rs is None or rs.name != "rsqrt":
      continue
    red = _through_shape_ops(graph, rs.inputs[0])
    if red is not None and red.name == "reduce_sum" and \
        red.inputs[0] == exp.outputs[0]:
      return True
  return False


def _softmax(original, x, axis=-1, where=None, **kwargs):
  ndim = getattr(x, "ndim", 0)
  last = axis in (-1, ndim - 1) if isinstance(axis, int) else (
      isinstance(axis, tuple) and len(axis) == 1 and axis[0] in (-1, ndim - 1))
  if where is not None or kwargs or not last or ndim == 0:
    return original(x, axis=axis, where=where, **kwargs)
  if x.shape[-1] > SOFTMAX_EXP_ABOVE:
    return softmax_exp(x)
  return _softmax_composite(x)


_original = intercept.register(jax.nn.softmax, _softmax)

HANDLERS = (FixedRange(),)
