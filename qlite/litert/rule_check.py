"""Which :class:`qlite.QuantizationRule` options the LiteRT full-integer
export honours: the one place that refuses the others.

Every rule field, for the LiteRT path (``ConversionProvider``, so
``export_tflite``, ``compare`` and the fake-quant model):

* ``module_path``, ``op_names``: honoured (matching is backend-independent).
* ``weight_qtype``: ``int8`` (per output channel), ``int4`` (verified on
  FULLY_CONNECTED, CONV_2D and DEPTHWISE_CONV_2D: LiteRT matches the
  fake-quant model) or ``None``. ``int16`` weights are refused: LiteRT's
  int8-activation kernels reject them when the model is prepared
  (``fully_connected.cc: input->type != kTfLiteInt16``). Any other qtype has
  no LiteRT kernels.
* ``act_qtype``: ``int8`` or ``None``. ``int16`` (LiteRT's 16x8 mode) needs
  symmetric int16 activations (zero point 0) that qlite's calibrated
  asymmetric scales are not: LiteRT refuses the model at prepare
  (``input->params.zero_point != 0``).
* ``act_static_scale=False`` (dynamic range): refused; the full-integer
  export only has calibrated (static) activation scales.
* ``act_calibration_method``, ``act_aggregation``, ``act_fixed_range``:
  honoured (they only shape the calibrated ranges; what is degenerate or
  ignored whatever the backend is refused by the rule itself).
* ``weight_calibration_method``: ``absmax`` only. ``minmax`` gives
  per-channel weights with nonzero zero points, which LiteRT's
  FULLY_CONNECTED ignores (8.4 dB vs 41.3 dB fake-quant) and CONV_2D
  refuses.
* ``weight_tile_size``: refused; LiteRT quantizes weights per output
  channel, with no sub-channel tiles.

``qlite.calibrate`` does not run these checks: its statistics serve the XLA
backend too (``qlite.xla.PtqProvider`` honours tiles, ``minmax`` weights,
dynamic range and other qtypes), and calibration only reads the activation
options, which every backend shares.
"""

from __future__ import annotations

from typing import Sequence

from qlite.errors import QTypeError, RuleError
from qlite.rules import QuantizationRule

__all__ = ["LITERT_ACT_QTYPES", "LITERT_WEIGHT_QTYPES", "LiteRTQTypeError",
           "check_rules_for_litert", "check_rule_for_litert"]

LITERT_WEIGHT_QTYPES = ("int8", "int4")
LITERT_ACT_QTYPES = ("int8",)

_XLA = "qlite.xla.PtqProvider (the XLA backend) supports it"


class LiteRTQTypeError(RuleError, QTypeError):
  """A rule's qtype that the LiteRT export cannot run: both a
  :class:`qlite.RuleError` (the rule is refused) and a
  :class:`qlite.QTypeError` (the qtype is the cause)."""


def _where(index: int, rule: QuantizationRule) -> str:
  return f"rules[{index}] (module_path={rule.module_path!r})"


def _qtype_problem(field: str, value: str) -> str | None:
  if field == "weight_qtype":
    if value in LITERT_WEIGHT_QTYPES:
      return None
    if value == "int16":
      return ("weight_qtype='int16' cannot be exported to LiteRT: its "
              "FULLY_CONNECTED / CONV_2D kernels with int8 activations take "
              "int8 (or int4) weights and refuse int16 ones when the model "
              "is prepared; use weight_qtype='int8' (or 'int4')")
    return (f"weight_qtype={value!r} cannot be exported to LiteRT (no "
            f"integer kernels for it); use weight_qtype='int8' (or 'int4'); "
            f"{_XLA}")
  if value in LITERT_ACT_QTYPES:
    return None
  if value == "int16":
    return ("act_qtype='int16' cannot be exported to LiteRT: its 16x8 "
            "kernels need symmetric int16 activations (zero point 0) and "
            "qlite calibrates asymmetric ones, so LiteRT refuses the model "
            "when it is prepared; use act_qtype='int8'")
  return (f"act_qtype={value!r} cannot be exported to LiteRT: its "
          f"full-integer kernels take int8 activations; use act_qtype='int8'")


def check_rule_for_litert(index: int, rule: QuantizationRule) -> None:
  """Raises when ``rule`` (``rules[index]``) has an option the LiteRT
  full-integer export ignores or cannot honour.

  Raises:
    LiteRTQTypeError: a weight / activation qtype LiteRT cannot run (a
      ``RuleError`` and a ``QTypeError``).
    RuleError: any other option LiteRT cannot honour; the message names the
      rule index, its module_path, the option and what to use instead.
  """
  where = _where(index, rule)
  for field in ("weight_qtype", "act_qtype"):
    value = getattr(rule, field)
    if value is not None:
      problem = _qtype_problem(field, value)
      if problem:
        raise LiteRTQTypeError(f"{where}: {problem}")
  if rule.weight_calibration_method != "absmax":
    raise RuleError(
        f"{where}: weight_calibration_method="
        f"{rule.weight_calibration_method!r} (asymmetric weights with zero "
        f"points) is not supported by the LiteRT export: LiteRT int8 weights "
        f"must be symmetric (FULLY_CONNECTED ignores weight zero points, "
        f"CONV_2D refuses them); use weight_calibration_method='absmax' (the "
        f"default); {_XLA}")
  if rule.act_qtype is not None and not rule.act_static_scale:
    raise RuleError(
        f"{where}: act_static_scale=False (dynamic-range activations) is not "
        f"supported by the LiteRT full-integer export, which uses calibrated "
        f"static activation scales; use act_static_scale=True (the default) "
        f"with stats from qlite.calibrate; {_XLA}")
  if rule.weight_tile_size is not None:
    raise RuleError(
        f"{where}: weight_tile_size={rule.weight_tile_size!r} (sub-channel "
        f"weight tiles) is not supported by the LiteRT export, which "
        f"quantizes weights per output channel; drop weight_tile_size; "
        f"{_XLA}")


def check_rules_for_litert(rules: Sequence[QuantizationRule]) -> None:
  """Runs :func:`check_rule_for_litert` on every rule, in order (the first
  problem raises)."""
  for index, rule in enumerate(rules):
    check_rule_for_litert(index, rule)
