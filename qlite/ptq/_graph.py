"""What the PTQ algorithms need from a traced model: its weighted layers (a
conv / dot_general whose weight is a model parameter), the per-channel
parameter that shifts each layer's output (a bias, or a BatchNorm mean), and
functions that capture values of the float and the fake-quant model."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from qlite.quant.plan import Plan, WeightSpec
from qlite.trace import graph as graph_lib
from qlite.trace.graph import Graph, Lit, Node

# Ops that move a parameter to where it is used without changing its values.
_PASS = ("broadcast_in_dim", "reshape", "convert_element_type", "squeeze",
         "expand_dims", "copy", "copy_p")


@dataclasses.dataclass
class Layer:
  """A weighted op whose weight is parameter ``param`` (flat index)."""
  node: Node
  weight_operand: int
  act_operand: int
  param: int
  spec: WeightSpec
  # (flat index, sign) of the per-channel parameter added to the output
  # (bias: sign -1, the correction is subtracted) or subtracted from it
  # (BatchNorm mean: sign +1), or None.
  shift: tuple[int, float] | None = None

  @property
  def name(self) -> str:
    return f"{self.node.module_path or '<root>'}/{self.node.name}"


def param_source(graph: Graph, var) -> int | None:
  """The flat parameter index ``var`` is (through value-preserving shape
  ops), or None."""
  for _ in range(8):
    if isinstance(var, Lit):
      return None
    if var in graph.param_vars:
      return graph.param_vars.index(var)
    node = graph.producer.get(var)
    if node is None or node.name not in _PASS:
      return None
    var = node.inputs[0]
  return None


def _shift_param(graph: Graph, node: Node, channels: int, flat_params):
  out = node.outputs[0]
  users = graph.consumers.get(out, [])
  if len(users) != 1 or users[0].name not in ("add", "sub"):
    return None
  user = users[0]
  i = user.inputs.index(out)
  if len(user.inputs) != 2:
    return None
  other = user.inputs[1 - i]
  p = param_source(graph, other)
  if p is None or np.shape(flat_params[p]) != (channels,):
    return None
  if np.shape(graph.avals[out].shape)[0] == 0 or \
      graph.avals[out].shape[-1] != channels:
    return None
  if user.name == "add":
    return (p, -1.0)
  return (p, 1.0) if i == 0 else None       # out - mean, not mean - out


def weighted_layers(graph: Graph, plan: Plan, flat_params) -> list[Layer]:
  """The conv / dot_general ops whose weight is a parameter used by that op
  only, with the output channel last (Flax's layout), in graph order."""
  layers = []
  for (ni, op), spec in sorted(plan.weights.items()):
    node = graph.nodes[ni]
    if node.name not in ("conv_general_dilated", "dot_general") or \
        len(node.inputs) != 2 or spec.channel_axis is None:
      continue
    var = node.inputs[op]
    if isinstance(var, Lit) or var not in graph.param_vars:
      continue
    if len(graph.consumers.get(var, [])) != 1:
      continue                   # shared (tied) weight: left alone
    p = graph.param_vars.index(var)
    w = flat_params[p]
    channels = np.shape(w)[spec.channel_axis]
    if graph.avals[node.outputs[0]].shape[-1] != channels:
      continue
    act = node.inputs[1 - op]
    if not graph.is_activation(act):
      continue
    layers.append(Layer(node, op, 1 - op, p, spec,
                        _shift_param(graph, node, channels, flat_params)))
  return layers


def float_capture(graph: Graph, vars_: Sequence[int]):
  """Returns jitted ``f(flat_params, flat_args) -> [values of vars_]`` of the
  float model."""
  sub = dataclasses.replace(graph, out_vars=list(vars_))
  return jax.jit(lambda p, a: graph_lib.evaluate(sub, p, a))


def fake_quant_capture(provider, graph: Graph, plan: Plan, flat_params,
                       vars_: Sequence[int]):
  """Returns jitted ``f(*flat_args) -> [values of vars_]`` of the fake-quant
  model (``provider``: a ``ConversionProvider`` holding the stats)."""
  sub = dataclasses.replace(graph, out_vars=list(vars_))
  return jax.jit(provider.function(sub, plan, list(flat_params)))


def flat_args(batch) -> list:
  args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
  return [np.asarray(a) for a in jax.tree.leaves(args)]


def as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def rebuild(model, params_tree: Any, leaves: Sequence[Any]):
  """Returns ``(model, variables)`` holding ``leaves``: Linen (the same
  module, new variables) or NNX (a new module, None)."""
  tree = jax.tree.unflatten(jax.tree.structure(params_tree), list(leaves))
  from flax import nnx
  if isinstance(model, nnx.Module):
    graphdef, _ = nnx.split(model)
    return nnx.merge(graphdef, tree), None
  return model, tree
