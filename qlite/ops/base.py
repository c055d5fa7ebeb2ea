"""The op-handler interface and its registry.

An :class:`OpHandler` says, for a family of jax primitives (and the
composites qlite traces them as), everything the boundary planner must know
to make a full-integer LiteRT model: is the op weighted (and along which axis
its weight is quantized), does it pass its input's scale through, does it fuse
into the conv / fully-connected before it, which constant operands get a
per-tensor boundary, does its int8 kernel fix the output scale or demand that
its inputs share the output's, how does the kernel round. The planner
(:mod:`qlite.quant.plan`) asks :data:`REGISTRY` and never names an op itself.

Rewrites (tracing a library function as a composite, e.g. ``jax.nn.softmax``
as ``odml.softmax``) are registered by the same handler module through
:mod:`qlite.trace.intercept`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

# Roles of an op in the plan.
WEIGHTED = "weighted"          # conv / dot_general with a constant operand
"""Role of an op with a constant weight operand (conv, ``dot_general``):
the weight is quantized (per output channel) and the output gets its own
calibrated boundary."""
PASS_THROUGH = "pass_through"  # runs on int8 at its input's scale
"""Role of an op that runs on int8 at its input's scale (reshape,
transpose, slice, max pool): no boundary of its own."""
COMPUTE = "compute"            # output gets its own calibrated boundary
"""Role of every other op: its output gets its own calibrated per-tensor
boundary."""


class PlanContext:
  """What a handler may read about the graph being planned.

  Attributes:
    graph: the :class:`qlite.trace.graph.Graph`.
  """

  def __init__(self, graph, registry: "Registry",
               static_value: Callable[[Any, int], Any],
               is_const_operand: Callable[[Any, int], bool],
               value_of: Callable[[int], Any] | None = None):
    self._value_of = value_of
    self.graph = graph
    self.registry = registry
    self._static_value = static_value
    self._is_const_operand = is_const_operand

  def static_value(self, node, i: int):
    """Operand ``i``'s constant value (numpy) when it is a literal or a small
    param-free constant, else None."""
    return self._static_value(node, i)

  def is_const_operand(self, node, i: int) -> bool:
    """True when operand ``i`` is a float constant (literal or static)."""
    return self._is_const_operand(node, i)

  def value_of(self, var: int):
    """The value of var ``var`` when it is a small param-free constant."""
    return self._value_of(var) if self._value_of else None

  def handler(self, node) -> "OpHandler":
    """The handler of ``node``'s op."""
    return self.registry[node.name]

  def activation_inputs(self, node) -> list[int]:
    """Indices of ``node``'s inputs that are activations (computed from the
    model inputs, not constants or params)."""
    return [i for i, a in enumerate(node.inputs)
            if self.graph.is_activation(a)]


class OpHandler:
  """Everything the planner knows about one family of ops.

  Subclasses set ``family``, ``primitives`` (jax primitive or composite
  names), ``litert_ops`` (what they become in a full-integer model; the
  coverage table in ``docs/`` is generated from these) and override the
  hooks that apply; the defaults describe a plain compute op with its own
  calibrated output boundary and no constant operands.
  """
  family: str = ""
  primitives: frozenset = frozenset()
  litert_ops: tuple = ()
  notes: str = ""
  # How far below the masked value's range a mask fill lands (masked_fill).
  mask_margin: float = 0.0

  def role(self, node) -> str:
    """:data:`WEIGHTED`, :data:`PASS_THROUGH` or :data:`COMPUTE`."""
    return COMPUTE

  def weight_axis(self, node, operand: int, ndim: int) -> int | None:
    """Output-channel axis of a weighted op's constant operand (None: per
    tensor)."""
    return None

  def accepts_fusion(self, node) -> bool:
    """Whether a weighted op (``node``) takes following bias / affine /
    activation ops into its kernel."""
    return False

  def chain_fusion(self, node, ctx: PlanContext, chain, direct: bool,
                   activated: bool) -> str | None:
    """How ``node`` fuses into the conv / fully-connected ``chain`` that
    produced its one activation input: ``"affine"`` (a bias, BatchNorm's
    per-channel scale / shift), ``"activation"`` (relu, relu6) or None.
    ``direct``: the input comes straight from ``chain`` (not after other
    fused ops); ``activated``: an activation is already fused."""
    return None

  def quantized_constants(self, node, ctx: PlanContext) -> list[tuple[int, bool]]:
    """``(operand, reciprocal)`` of the float constant operands that get a
    per-tensor boundary (``reciprocal``: the op divides by it and runs as a
    multiplication by the quantized reciprocal)."""
    return []

  def zero_point_operands(self, node, ctx: PlanContext) -> tuple[int, ...]:
    """Activation operands LiteRT wants at zero point 0 (symmetric int8):
    the value is quantized symmetric, at any scale its range needs."""
    return ()

  def swap_operand(self, node, i: int) -> int | None:
    """The operand that can take operand ``i``'s place (the op computed by
    :meth:`lower_swapped`), or None."""
    return None

  def lower_swapped(self, node, invals: list) -> list:
    """The op's outputs computed with the operands :meth:`swap_operand`
    names swapped."""
    raise NotImplementedError(node.name)

  def quantizes_without_float_output(self, node) -> bool:
    """True for ops with a non-float output (comparisons) whose constant
    operands are still quantized."""
    return False

  def scale_fuses_into(self, node, consumer, ctx: PlanContext) -> bool:
    """True when ``consumer`` (a scaling by a constant) fuses with ``node``
    into one LiteRT op (a sum followed by a scale is MEAN / AVERAGE_POOL_2D):
    no boundary in between."""
    return False

  def scales_by_constant(self, node, ctx: PlanContext) -> bool:
    """True when ``node`` multiplies / divides by a constant."""
    return False

  def fixed_range(self, name: str) -> tuple[float, float] | None:
    """The output range LiteRT's int8 kernel demands, or None."""
    return None

  def same_scale_output(self, node, ctx: PlanContext, scaled_by) -> list[int] | None:
    """For ops whose int8 kernel reads its activation inputs at its output's
    scale: the output var(s) that share a range with those inputs (the first
    is the op's output), else None. ``scaled_by``: reduce_window_sum node
    index -> the node that scales it into an average pool."""
    return None

  def output_rounding(self, summed_node) -> str | None:
    """How LiteRT rounds the output of ``summed_node`` scaled into one op
    ("half_away"), or None for round half to even."""
    return None

  def activation_kind(self, node, ctx: PlanContext) -> str | None:
    """``"relu"`` / ``"relu6"`` / ``"min6"`` when ``node`` is a clamp LiteRT
    fuses as an activation, else None."""
    return None

  def masked_fill(self, node, ctx: PlanContext) -> tuple[int, int] | None:
    """``(fill operand, value operand)`` when ``node`` masks the value with
    a fill that int8 cannot represent beside it (an attention mask before a
    softmax): the output takes the value's range, the fill is clamped."""
    return None

  def virtual_constants(self, node, ctx: PlanContext) -> tuple:
    """Constants the op does not have as operands but runs with when it has
    no int8 kernel of its own (``neg``: -1, run as a MUL; a bool -> float
    cast: 0 and 1, run as a SELECT): each gets a per-tensor boundary and
    :meth:`lower` computes the op from them. Empty: the op runs as itself."""
    return ()

  def lower(self, node, invals: list, consts: list) -> list:
    """The op's outputs computed from its inputs and its quantized
    :meth:`virtual_constants`."""
    raise NotImplementedError(node.name)

  def reads_constant_values(self) -> bool:
    """True when the handler pattern-matches constant operand values (the
    planner then computes small param-free constants up front)."""
    return False


class Registry:
  """Maps primitive / composite names to their :class:`OpHandler`."""

  def __init__(self):
    self._by_name: dict[str, OpHandler] = {}
    self._handlers: list[OpHandler] = []
    self._default = OpHandler()

  def register(self, handler: OpHandler) -> OpHandler:
    """Adds ``handler``; raises ValueError when it claims a name another
    handler owns."""
    for name in handler.primitives:
      other = self._by_name.get(name)
      if other is not None:
        raise ValueError(f"op {name!r} claimed by {other.family!r} and "
                         f"{handler.family!r}")
      self._by_name[name] = handler
    self._handlers.append(handler)
    return handler

  def __getitem__(self, name: str) -> OpHandler:
    return self._by_name.get(name, self._default)

  def handler(self, node) -> OpHandler:
    """The handler of ``node``'s op (the default compute handler for an op
    no family registers)."""
    return self[node.name]

  def __contains__(self, name: str) -> bool:
    return name in self._by_name

  @property
  def handlers(self) -> list[OpHandler]:
    """The registered handlers, in registration order."""
    return list(self._handlers)


def is_zero(value) -> bool:
  return value is not None and np.size(value) > 0 and \
      bool(np.all(np.asarray(value) == 0))


def all_equal(value, number: float) -> bool:
  return value is not None and np.size(value) > 0 and \
      bool(np.all(np.asarray(value) == number))


def names(*groups: Iterable[str]) -> frozenset:
  return frozenset(n for g in groups for n in g)
