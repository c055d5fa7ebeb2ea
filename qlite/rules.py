"""Quantization rules: which ops of which Flax modules are quantized, and how.

A rule selects ops by the Flax module path they run in (a regex matched with
``re.fullmatch`` against paths such as ``Encoder_0/Attention/Dense_2``; the
root module's own ops have the path ``""``) and optionally by op name (the jax
primitive: ``conv_general_dilated``, ``dot_general``, ``add``...). The first
rule that matches an op wins. Ops no rule matches stay in float.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Sequence

from qlite.core import calibration, qtypes
from qlite.core.calibration import AGGREGATIONS
from qlite.errors import CalibrationError, RuleError, QTypeError


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
      scales computed on the fly (dynamic range, XLA backend only) when False.
    act_calibration_method: a registered calibration method
      (:func:`qlite.core.calibration.method_names`; built in: ``minmax``,
      ``absmax``, ``rms``, ``fixed`` (needs ``act_fixed_range``),
      ``percentile``, ``mse``, ``quantile``); ``None`` (default) uses the
      ``method`` given to :func:`qlite.calibrate` (``minmax`` by default).
    act_aggregation: how per-batch statistics combine
      (:data:`qlite.core.calibration.AGGREGATIONS`): ``global`` running
      min/max (default), ``ema`` moving average, ``percentile`` mean of the
      per-batch percentiles. Read by ``minmax`` and ``absmax``.
    act_fixed_range: ``(lo, hi)`` for a method that needs one (``fixed``).
    weight_calibration_method: ``absmax`` (symmetric, default) or ``minmax``.
    weight_tile_size: sub-channel tile size along the contraction axis (XLA).
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
    if isinstance(self.op_names, str):
      object.__setattr__(self, "op_names", (self.op_names,))
    elif self.op_names is not None:
      object.__setattr__(self, "op_names", tuple(self.op_names))
    for field in ("weight_qtype", "act_qtype"):
      value = getattr(self, field)
      if value is not None:
        try:
          qtypes.get_qtype(value)
        except QTypeError as e:
          raise QTypeError(f"QuantizationRule(module_path={self.module_path!r})"
                           f".{field}: {e}") from None
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
