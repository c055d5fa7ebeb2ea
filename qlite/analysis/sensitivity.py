"""Turn a compare :class:`~qlite.compare.Report` into rules that keep the
layers quantization hurts most in float."""

from __future__ import annotations

import re
from typing import Sequence

from qlite.analysis.compare import LAYER_METRICS, Report
from qlite.errors import QliteError
from qlite.rules import QuantizationRule

__all__ = ["find_sensitive_layers", "rules_keeping_float"]


def find_sensitive_layers(report: Report, min_sqnr_db: float = 30.0,
                          metric: str = "fakequant_vs_float") -> list[str]:
  """Returns the Flax module paths whose layer SQNR (dB, for ``metric``) is
  below ``min_sqnr_db``, worst first, each once.

  ``metric``: ``fakequant_vs_float`` (default; error accumulated up to that
  layer), ``litert_vs_float``, ``litert_vs_fakequant`` or ``own_vs_float``
  (the float activation quantized with that boundary's scale alone: the
  noise the layer's own quantization adds). Model inputs (no module path)
  are never returned: no module-path rule keeps them float.

  Raises:
    QliteError: ``report`` is not a Report, or an unknown ``metric``.
  """
  if not isinstance(report, Report):
    raise QliteError(f"find_sensitive_layers takes the Report from "
                     f"qlite.compare, got {type(report).__name__}")
  if metric not in LAYER_METRICS:
    raise QliteError(f"unknown metric {metric!r}; choose one of "
                     f"{', '.join(LAYER_METRICS)}")
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
  """Returns ``base_rules`` with one rule per module path prepended that
  keeps that module's weights and activations in float (first match wins).

  The exported model then has float islands: export it with
  ``strict=False``.

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
