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
* ``act_qtype``: ``int8``, ``int16`` or ``None``. ``int16`` is LiteRT's
  16x8 mode (int16 activations, int8 weights): its activations are
  symmetric (zero point 0, ``quant.scales.symmetric_acts``), conv /
  fully-connected biases int64 (``convert.int16_biases_to_int64``), and
  rules may mix int8 and int16 modules in one model (a QUANTIZE requantizes
  between them). Ops LiteRT has no 16x8 kernel for are refused when the
  model is traced (:data:`NO_16X8_KERNEL`, ``docs/litert_int16_ops.md``).
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
           "NO_16X8_KERNEL", "check_rules_for_litert", "check_rule_for_litert",
           "no_16x8_kernel_message"]

LITERT_WEIGHT_QTYPES = ("int8", "int4")
LITERT_ACT_QTYPES = ("int8", "int16")

# jax op (or composite) -> the LiteRT op that has no 16x8 form in the
# converter (probed by bench/int16_ops.py; docs/litert_int16_ops.md).
# (GELU has none either: an int16 GELU runs as its tanh form, MUL / SUB /
# TANH, litert.providers._gelu_int16.)
NO_16X8_KERNEL = {
    "concatenate": "CONCATENATION",
    "gather": "GATHER_ND",
}

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
  return (f"act_qtype={value!r} cannot be exported to LiteRT: its "
          f"full-integer kernels take int8 activations; use act_qtype='int8'")


def no_16x8_kernel_message(op: str, module_path: str, source: str,
                           rule_index: int, reads: tuple[str, str] | None
                           = None) -> str:
  """The refusal of an int16 op LiteRT has no 16x8 kernel for: names the
  op, its module and the fix (an int8 rule: a mixed model). ``reads``:
  ``(module_path, op)`` of the value a pass-through op (gather...) reads,
  whose qtype it runs at."""
  where = f"op `{op}` in module `{module_path or '<root>'}`" + (
      f" ({source})" if source else "")
  head = (f"{where} runs at int16 but LiteRT has no 16x8 kernel for it "
          f"({NO_16X8_KERNEL[op]} takes int8 or float only; "
          f"docs/litert_int16_ops.md): ")
  if reads is not None:
    mod, src_op = reads
    return head + (
        f"it runs at the qtype of the value it reads, op `{src_op}` in "
        f"module `{mod or '<root>'}` (rules[{rule_index}]): put a rule with "
        f"act_qtype='int8' for that module before the int16 one, e.g. "
        f"QuantizationRule(module_path={(mod or '.*')!r}, op_names="
        f"({src_op!r},), act_qtype='int8') (a QUANTIZE requantizes between "
        f"the int8 and int16 regions)")
  return head + (
      f"rules[{rule_index}] gives it act_qtype='int16'; put a rule with "
      f"act_qtype='int8' for it before that one, e.g. QuantizationRule("
      f"module_path={(module_path or '.*')!r}, op_names=({op!r},), "
      f"act_qtype='int8') (a QUANTIZE requantizes between the int8 and "
      f"int16 regions)")


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
