"""Quantization rules: which ops of which Flax modules are quantized, and how.

A rule selects ops by the Flax module path they run in (a regex matched with
``re.fullmatch`` against paths such as ``Encoder_0/Attention/Dense_2``; the
root module's own ops have the path ``""``) and optionally by op name (the jax
primitive: ``conv_general_dilated``, ``dot_general``, ``add``...). The first
rule that matches an op wins. Ops no rule matches stay in float.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Sequence

import numpy as np

from qlite.core import calibration, qtypes
from qlite.core.calibration import AGGREGATIONS
from qlite.errors import CalibrationError, RuleError, QTypeError


# A fixed range narrower than this is treated as a constant tensor by the
# boundary scales (qlite.quant.scales.ZERO_RANGE_WIDTH: replaced by a
# unit-wide range), so it is refused here instead of silently widened.
MIN_FIXED_RANGE_WIDTH = 1e-6

# Built-in methods whose range does not depend on act_aggregation (besides
# the aggregation a method uses by itself): the aggregation would be
# silently ignored. Registered methods are assumed to read it.
_AGGREGATION_FREE = {"rms": (), "fixed": (), "mse": (), "quantile": (),
                     "percentile": ("percentile",)}


def aggregation_ignored(rule: "QuantizationRule", method: str) -> str | None:
  """Why ``rule.act_aggregation`` has no effect under range ``method`` (the
  rule's own, or the one given to :func:`qlite.calibrate`), or None.

  A method that does not suit the rule's act qtype is looked at through its
  fallback (``mse`` -> ``minmax`` for float qtypes), as the export does.
  """
  if rule.act_aggregation == "global" or rule.act_qtype is None:
    return None
  try:
    kind = qtypes.get_qtype(rule.act_qtype).kind
    resolved = calibration.registry.resolve(method, kind).name
  except (CalibrationError, QTypeError):
    return None          # reported where the method / qtype is validated
  honoured = _AGGREGATION_FREE.get(resolved)
  if honoured is None or rule.act_aggregation in honoured:
    return None
  return (f"act_aggregation={rule.act_aggregation!r} is ignored by the "
          f"{resolved!r} range method (only 'minmax' and 'absmax' read the "
          f"aggregation): use act_calibration_method='minmax' or 'absmax' "
          f"with it, or drop act_aggregation")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizationRule:
  """How to quantize the ops matched by ``module_path`` (and ``op_names``).

  Attributes:
    module_path: regex, full-matched against the op's Flax module path.
    op_names: if given, only these jax primitives (e.g. ``("dot_general",)``).
    weight_qtype: qtype of weights (constant operands of conv / dot_general);
      ``None`` keeps weights in float.
    act_qtype: qtype of activations; ``None`` keeps activations in float.
    act_static_scale: static (calibrated) activation scales (SRQ) when True,
      scales computed on the fly (dynamic range, XLA backend only: the LiteRT
      export refuses it) when False.
    act_calibration_method: a registered calibration method
      (:func:`qlite.core.calibration.method_names`; built in: ``minmax``,
      ``absmax``, ``rms``, ``fixed`` (needs ``act_fixed_range``),
      ``percentile``, ``mse``, ``quantile``); ``None`` (default) uses the
      ``method`` given to :func:`qlite.calibrate` (``minmax`` by default).
    act_aggregation: how per-batch statistics combine
      (:data:`qlite.core.calibration.AGGREGATIONS`): ``global`` running
      min/max (default), ``ema`` moving average, ``percentile`` mean of the
      per-batch percentiles. Read by ``minmax`` and ``absmax`` (another
      method with a non-global aggregation is a ``RuleError``).
    act_fixed_range: ``(lo, hi)``, ``lo < hi``, finite, for a method that
      needs one (``fixed``); given with any other method it is a
      ``RuleError`` (it would be ignored).
    weight_calibration_method: ``absmax`` (symmetric, default) or ``minmax``
      (asymmetric: XLA backend only; the LiteRT export refuses it).
    weight_tile_size: sub-channel tile size along the contraction axis (XLA
      backend only; the LiteRT export refuses it).

  Options that would have no effect (activation options with
  ``act_qtype=None``, weight options with ``weight_qtype=None``) raise
  :class:`qlite.RuleError`; which options a backend honours is checked by
  its providers (LiteRT: :mod:`qlite.litert.rule_check`).
  """

  module_path: str = ".*"
  op_names: tuple[str, ...] | None = None
  weight_qtype: str | None = "int8"
  act_qtype: str | None = "int8"
  act_static_scale: bool = True
  act_calibration_method: str | None = None
  act_aggregation: str = "global"
  act_fixed_range: tuple[float, float] | None = None
  weight_calibration_method: str = "absmax"
  weight_tile_size: int | None = None

  def __post_init__(self):
    if not isinstance(self.module_path, str):
      raise RuleError(f"QuantizationRule.module_path must be a regex string, "
                      f"got {self.module_path!r}")
    try:
      object.__setattr__(self, "_regex", re.compile(self.module_path))
    except re.error as e:
      raise RuleError(f"QuantizationRule(module_path={self.module_path!r}): "
                      f"the regex does not compile ({e}); fix the pattern, "
                      f"e.g. '.*Dense.*'") from None
    self._check_op_names()
    for field in ("weight_qtype", "act_qtype"):
      value = getattr(self, field)
      if value is not None:
        try:
          qtypes.get_qtype(value)
        except QTypeError as e:
          raise QTypeError(f"QuantizationRule(module_path={self.module_path!r})"
                           f".{field}: {e}") from None
    if not isinstance(self.act_static_scale, (bool, np.bool_)):
      self._fail(f"act_static_scale must be True (calibrated scales) or "
                 f"False (dynamic range), got {self.act_static_scale!r}")
    method = None
    if self.act_calibration_method is not None:
      try:
        method = calibration.get_method(self.act_calibration_method)
      except CalibrationError:
        raise RuleError(
            f"QuantizationRule(module_path={self.module_path!r}): unknown "
            f"act_calibration_method {self.act_calibration_method!r}; choose "
            f"one of {', '.join(calibration.method_names())}") from None
      if method.needs_fixed_range and self.act_fixed_range is None:
        raise RuleError(
            f"QuantizationRule(module_path={self.module_path!r}): "
            f"act_calibration_method={method.name!r} needs "
            f"act_fixed_range=(lo, hi)")
    if self.act_fixed_range is not None:
      self._check_fixed_range(method)
    if self.act_aggregation not in AGGREGATIONS:
      raise RuleError(
          f"QuantizationRule(module_path={self.module_path!r}): unknown "
          f"act_aggregation {self.act_aggregation!r}; choose one of "
          f"{', '.join(AGGREGATIONS)}")
    if self.weight_calibration_method not in ("absmax", "minmax"):
      raise RuleError(
          f"QuantizationRule(module_path={self.module_path!r}): "
          f"weight_calibration_method must be 'absmax' or 'minmax', got "
          f"{self.weight_calibration_method!r}")
    if self.weight_tile_size is not None and (
        isinstance(self.weight_tile_size, (bool, np.bool_)) or
        not isinstance(self.weight_tile_size, (int, np.integer)) or
        self.weight_tile_size <= 0):
      self._fail(f"weight_tile_size must be a positive int (sub-channel "
                 f"tile along the contraction axis) or None, got "
                 f"{self.weight_tile_size!r}")
    self._check_no_effect()
    if self.act_calibration_method is not None:
      problem = aggregation_ignored(self, self.act_calibration_method)
      if problem:
        self._fail(problem)

  def _fail(self, message: str):
    raise RuleError(f"QuantizationRule(module_path={self.module_path!r}): "
                    f"{message}")

  def _check_op_names(self) -> None:
    names = self.op_names
    if names is None:
      return
    if isinstance(names, str):
      names = (names,)
    else:
      try:
        names = tuple(names)
      except TypeError:
        self._fail(f"op_names must be a jax primitive name or a sequence of "
                   f"them (e.g. ('dot_general',)), got {self.op_names!r}")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
      self._fail(f"op_names must be jax primitive names (strings, e.g. "
                 f"'dot_general', 'conv_general_dilated'), got {bad[0]!r} "
                 f"in {self.op_names!r}")
    if not names:
      self._fail("op_names=() matches no op: give primitive names, or "
                 "op_names=None for every op of the module")
    object.__setattr__(self, "op_names", names)

  def _check_fixed_range(self, method) -> None:
    """``act_fixed_range``: two finite numbers, lo < hi (and not narrower
    than a boundary scale can carry), read by the rule's method."""
    given = self.act_fixed_range
    try:
      if isinstance(given, (str, bytes)) or len(given) != 2 or any(
          isinstance(v, (str, bytes, bool, np.bool_)) for v in given):
        raise TypeError
      lo, hi = (float(v) for v in given)
    except (TypeError, ValueError):
      self._fail(f"act_fixed_range must be two numbers (lo, hi), got "
                 f"{given!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
      self._fail(f"act_fixed_range={given!r} must be finite")
    if lo > hi:
      self._fail(f"act_fixed_range={given!r} is reversed (lo > hi): give "
                 f"(lo, hi) with lo < hi, e.g. ({hi:g}, {lo:g})")
    if hi - lo < MIN_FIXED_RANGE_WIDTH:
      self._fail(f"act_fixed_range={given!r} is empty or degenerate (width "
                 f"{hi - lo:g} < {MIN_FIXED_RANGE_WIDTH:g}): every value "
                 f"would quantize to one level; give the range the "
                 f"activation really spans, e.g. (-1.0, 1.0) or (0.0, 6.0)")
    if method is None or not method.needs_fixed_range:
      used = (f"act_calibration_method={method.name!r} ignores it"
              if method is not None else
              "act_calibration_method is None (the calibrated range is used)")
      self._fail(f"act_fixed_range={given!r} is only read by "
                 f"act_calibration_method='fixed', and {used}: set "
                 f"act_calibration_method='fixed' to use the range, or drop "
                 f"act_fixed_range")
    object.__setattr__(self, "act_fixed_range", (lo, hi))

  def _check_no_effect(self) -> None:
    """Activation / weight options on a rule that keeps them in float."""
    if self.act_qtype is None:
      for name, default in (("act_calibration_method", None),
                            ("act_fixed_range", None),
                            ("act_aggregation", "global")):
        value = getattr(self, name)
        if value != default:
          self._fail(f"{name}={value!r} has no effect with act_qtype=None "
                     f"(activations stay float): set act_qtype='int8' or "
                     f"drop {name}")
    if self.weight_qtype is None:
      for name, default in (("weight_calibration_method", "absmax"),
                            ("weight_tile_size", None)):
        value = getattr(self, name)
        if value != default:
          self._fail(f"{name}={value!r} has no effect with weight_qtype=None "
                     f"(weights stay float): set weight_qtype='int8' or "
                     f"drop {name}")

  def matches(self, module_path: str, op_name: str) -> bool:
    """Returns True when this rule applies to ``op_name`` at ``module_path``."""
    if self.op_names is not None and op_name not in self.op_names:
      return False
    return self._regex.fullmatch(module_path) is not None  # type: ignore[attr-defined]


class RuleMatcher:
  """First-match lookup over a rule list that remembers which rules matched."""

  def __init__(self, rules: Sequence[QuantizationRule]):
    if isinstance(rules, QuantizationRule):
      rules = [rules]
    rules = list(rules)
    for i, r in enumerate(rules):
      if not isinstance(r, QuantizationRule):
        raise RuleError(f"rules[{i}] is a {type(r).__name__}, not a "
                        f"qlite.QuantizationRule")
    self.rules = tuple(rules)
    self._used: set[int] = set()

  def match(self, module_path: str, op_name: str
            ) -> tuple[int, QuantizationRule] | None:
    """Returns ``(index, rule)`` of the first matching rule, or None."""
    for i, r in enumerate(self.rules):
      if r.matches(module_path, op_name):
        self._used.add(i)
        return i, r
    return None

  def unmatched_rules(self) -> list[tuple[int, QuantizationRule]]:
    """Returns ``(index, rule)`` for every rule that matched no op so far."""
    return [(i, r) for i, r in enumerate(self.rules) if i not in self._used]

  def warn_unmatched(self) -> None:
    """Emits one ``UserWarning`` per rule that matched no op."""
    for i, r in self.unmatched_rules():
      warnings.warn(f"qlite: rules[{i}] (module_path={r.module_path!r}, "
                    f"op_names={r.op_names}) matched no op in the model",
                    UserWarning, stacklevel=3)
