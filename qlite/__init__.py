"""qlite: quantize Flax (Linen / NNX) models; export full-integer LiteRT
``.tflite`` files and run the same rules on XLA."""

from qlite.errors import (QliteError, QTypeError, RuleError, CalibrationError,
                          ConversionError, UnsupportedOpError,
                          TFLiteFormatError)
from qlite.rules import QuantizationRule
from qlite.core.stats import QuantStats
from qlite.quant.provider import quantize_model, QuantizedModel, Provider
from qlite.litert.inspect import inspect_tflite, TFLiteInfo
from qlite.litert.runtime import TFLiteRunner
from qlite.litert.pipeline import (calibrate, export_tflite, export_float_tflite)
from qlite import annotate
from qlite import xla
from qlite import ptq
from qlite import kernels
from qlite.qat import QatProvider, QatModel, stats_from_qat
from qlite.analysis.report import Report
from qlite.analysis.runner import compare
from qlite.analysis.sensitivity import find_sensitive_layers, rules_keeping_float
from qlite.analysis.autotune import autotune, AutotuneReport
from qlite import metrics

__version__ = "0.1.0"

__all__ = [
    "QliteError", "QTypeError", "RuleError", "CalibrationError",
    "ConversionError", "UnsupportedOpError", "TFLiteFormatError",
    "QuantizationRule", "QuantStats", "quantize_model", "QuantizedModel",
    "Provider", "inspect_tflite", "TFLiteInfo", "TFLiteRunner", "calibrate",
    "export_tflite", "export_float_tflite", "annotate", "QatProvider", "xla", "kernels",
    "QatModel", "stats_from_qat",
    "compare", "Report", "find_sensitive_layers", "rules_keeping_float",
    "metrics", "ptq", "autotune", "AutotuneReport",
]
