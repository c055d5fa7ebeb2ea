"""The calibration range methods, by name: each method is one
:class:`CalibrationMethod` (its module under
:mod:`qlite.core.calibration.methods`) registered here.

A method declares which statistics it needs recorded (percentiles,
histograms), whether it reads statistics at all (``"fixed"`` does not),
which qtype kinds its range suits (``"mse"``: uniform int grids only) and
which method stands in for it otherwise. A new method is one
:func:`register` call::

    from qlite.core import calibration as C

    def half_range(record, ctx):
      lo, hi = C.aggregated_range(record, ctx.aggregation, ctx.name)
      return lo / 2, hi / 2

    C.register(C.CalibrationMethod("half", half_range))
    qlite.calibrate(model, rules, batches, method="half")
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from qlite.core.calibration import stats
from qlite.errors import CalibrationError

__all__ = [
    "CalibrationMethod",
    "RangeContext",
    "get",
    "names",
    "register",
    "resolve",
    "unregister",
]


@dataclasses.dataclass(frozen=True)
class RangeContext:
  """What a method's range function may read besides the record.

  Attributes:
    aggregation: one of :data:`~qlite.core.calibration.stats.AGGREGATIONS`.
    fixed_range: the rule's ``act_fixed_range`` (``"fixed"``), or None.
    levels: number of quantization steps (``qmax - qmin``; 255 for int8).
    name: the boundary, for error messages.
    qtype_kind: ``"int"``, ``"float"``, ``"nf4"``, or None when unknown.
    options: method-specific parameters by name (e.g. ``rms_multiplier``);
      a method reads its own and has a default for each.
  """

  aggregation: str = "global"
  fixed_range: tuple[float, float] | None = None
  levels: int = 255
  name: str = "<unnamed boundary>"
  qtype_kind: str | None = None
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


RangeFn = Callable[[Mapping[str, object], RangeContext], tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class CalibrationMethod:
  """One calibration range method.

  Attributes:
    name: the name rules and :func:`qlite.calibrate` use.
    range_fn: ``range_fn(record, ctx) -> (lo, hi)`` python floats; ``record``
      is an aggregated, finite record (when ``reads_statistics``), ``ctx`` a
      :class:`RangeContext`. Raises ``CalibrationError`` on unusable input.
    needs_percentiles: calibration must record the per-batch percentiles.
    needs_histogram: calibration must record the logarithmic histograms.
    reads_statistics: False for a method that ignores the record (it is
      then neither aggregated nor checked for NaN / Inf).
    needs_fixed_range: the rule must give ``act_fixed_range``.
    qtype_kinds: the qtype kinds whose range this method suits; None: all.
    fallback: the method used instead for any other qtype kind.
  """

  name: str
  range_fn: RangeFn
  needs_percentiles: bool = False
  needs_histogram: bool = False
  reads_statistics: bool = True
  needs_fixed_range: bool = False
  qtype_kinds: tuple[str, ...] | None = None
  fallback: str | None = None

  def range(self, record: Mapping[str, object], ctx: RangeContext
            ) -> tuple[float, float]:
    """Computes the range of one boundary with this method.

    Args:
      record: an aggregated record, or one batch's statistics (aggregated
        here as one batch); ignored when not ``reads_statistics``.
      ctx: the :class:`RangeContext`.

    Returns:
      ``(lo, hi)`` python floats.

    Raises:
      CalibrationError: unknown aggregation, NaN / Inf or missing
        statistics, or whatever ``range_fn`` raises.
    """
    stats.check_aggregation(ctx.aggregation)
    if self.reads_statistics:
      record = stats.as_record(record)
      stats.check_finite(record, ctx.name)
    return self.range_fn(record, ctx)


_METHODS: dict[str, CalibrationMethod] = {}


def register(method: CalibrationMethod, *, replace: bool = False
             ) -> CalibrationMethod:
  """Adds a method to the registry.

  Args:
    method: the :class:`CalibrationMethod`.
    replace: allow replacing a registered method of the same name.

  Returns:
    ``method``.

  Raises:
    CalibrationError: not a CalibrationMethod, an empty name, or the name is
      taken (and not ``replace``).
  """
  if not isinstance(method, CalibrationMethod):
    raise CalibrationError(f"register() takes a CalibrationMethod, got "
                           f"{type(method).__name__}.")
  if not isinstance(method.name, str) or not method.name:
    raise CalibrationError(f"a calibration method needs a non-empty name, "
                           f"got {method.name!r}.")
  if method.name in _METHODS and not replace:
    raise CalibrationError(f"calibration method {method.name!r} is already "
                           f"registered; pass replace=True to replace it.")
  _METHODS[method.name] = method
  return method


def unregister(name: str) -> None:
  """Removes a registered method (e.g. one a test added).

  Args:
    name: the method's name.

  Raises:
    CalibrationError: no method of that name is registered.
  """
  get(name)
  del _METHODS[name]


def names() -> tuple[str, ...]:
  """The registered method names.

  Returns:
    The names, in registration order (the built-in ones first).
  """
  return tuple(_METHODS)


def get(name: str, *, boundary: str | None = None) -> CalibrationMethod:
  """Looks a method up by name.

  Args:
    name: the method's name.
    boundary: the boundary it is wanted for, named in the message.

  Returns:
    The :class:`CalibrationMethod`.

  Raises:
    CalibrationError: no method of that name (lists the valid names).
  """
  method = _METHODS.get(name) if isinstance(name, str) else None
  if method is None:
    where = f" for {boundary!r}" if boundary else ""
    raise CalibrationError(
        f"Unknown calibration method {name!r}{where}; valid: "
        f"{', '.join(_METHODS)}.")
  return method


def resolve(name: str, qtype_kind: str | None = None, *,
            boundary: str | None = None) -> CalibrationMethod:
  """The method that computes the range for a qtype kind: ``name``'s own,
  or, where it declares ``qtype_kinds`` that exclude ``qtype_kind``, its
  ``fallback`` (followed until one suits).

  Args:
    name: the method's name.
    qtype_kind: the activation qtype's kind, or None (no fallback).
    boundary: the boundary, for messages.

  Returns:
    The :class:`CalibrationMethod` to use.

  Raises:
    CalibrationError: an unknown name, or a method that does not suit
      ``qtype_kind`` and has no fallback (or a fallback cycle).
  """
  method = get(name, boundary=boundary)
  seen = {method.name}
  while (qtype_kind is not None and method.qtype_kinds is not None
         and qtype_kind not in method.qtype_kinds):
    if method.fallback is None or method.fallback in seen:
      raise CalibrationError(
          f"calibration method {method.name!r} suits qtypes of kind "
          f"{', '.join(method.qtype_kinds)}, not {qtype_kind!r}"
          f"{f' (at {boundary!r})' if boundary else ''}; choose another "
          f"method.")
    method = get(method.fallback, boundary=boundary)
    seen.add(method.name)
  return method
