"""Turn a compare :class:`~qlite.analysis.report.Report` into rules that keep
the layers quantization hurts most in float."""

from __future__ import annotations

import re
from typing import Sequence

from qlite.analysis.report import Report, check_metric
from qlite.errors import QliteError
from qlite.rules import QuantizationRule

__all__ = ["find_sensitive_layers", "rules_keeping_float"]


def find_sensitive_layers(report: Report, min_sqnr_db: float = 30.0,
                          metric: str = "fakequant_vs_float") -> list[str]:
  """Finds the layers whose SQNR is below a floor.

  Model inputs (no module path) are never returned: no module-path rule
  keeps them float.

  Example usage::

    >>> report = qlite.compare(model, rules, stats, blob, batches,
    ...                        variables=variables)
    >>> paths = qlite.find_sensitive_layers(report, min_sqnr_db=30)
    >>> rules = qlite.rules_keeping_float(paths, rules)

  Args:
    report: the :class:`Report` from :func:`qlite.compare`.
    min_sqnr_db: the floor (dB); layers strictly below it are returned.
    metric: ``fakequant_vs_float`` (default; error accumulated up to that
      layer), ``litert_vs_float``, ``litert_vs_fakequant`` or
      ``own_vs_float`` (the float activation quantized with that boundary's
      scale alone: the noise the layer's own quantization adds).

  Returns:
    Flax module paths, lowest SQNR first, each once.

  Raises:
    QliteError: ``report`` is not a Report, or an unknown ``metric``.
  """
  if not isinstance(report, Report):
    raise QliteError(f"find_sensitive_layers takes the Report from "
                     f"qlite.compare, got {type(report).__name__}")
  check_metric(metric)
  rows = [r for r in report.layers if r.module_path
          and r.sqnr(metric) is not None and r.sqnr(metric) < min_sqnr_db]
  paths: list[str] = []
  for r in sorted(rows, key=lambda r: r.sqnr(metric)):
    if r.module_path not in paths:
      paths.append(r.module_path)
  return paths


def rules_keeping_float(paths: Sequence[str],
                        base_rules: Sequence[QuantizationRule]
                        ) -> list[QuantizationRule]:
  """Prepends rules that keep the given modules in float.

  The exported model then has float islands: export it with
  ``strict=False``.

  Example usage::

    >>> rules = qlite.rules_keeping_float(["Conv_1", "Dense_0"], rules)
    >>> blob = qlite.export_tflite(model, rules, stats, x,
    ...                            variables=variables, strict=False)

  Args:
    paths: Flax module paths (matched exactly, not as regexes), e.g. from
      :func:`find_sensitive_layers`.
    base_rules: the rules the other modules keep.

  Returns:
    One rule per path (weights and activations float), then ``base_rules``;
    the first matching rule wins.

  Raises:
    QliteError: ``paths`` is a single string or holds a non-string.
  """
  if isinstance(paths, str):
    raise QliteError("rules_keeping_float takes a list of module paths, got "
                     f"the string {paths!r}; wrap it in a list")
  for p in paths:
    if not isinstance(p, str):
      raise QliteError(f"module paths must be strings, got {p!r}")
  keep = [QuantizationRule(module_path=re.escape(p), act_qtype=None,
                           weight_qtype=None) for p in paths]
  return keep + list(base_rules)
