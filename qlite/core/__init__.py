"""qlite.core: qtypes, quantization numerics, QArray, calibration statistics.

Everything both backends (ODML annotate and XLA PTQ) share is defined here once.
"""

from qlite.core import calibration as _calibration
from qlite.core.calibration import CalibrationMethod
from qlite.core.calibration import activation_range
from qlite.core.calibration import aggregate
from qlite.core.calibration import batch_stats
from qlite.core.calibration import check_finite
from qlite.core.calibration import register as register_calibration_method
from qlite.core.numerics import ZERO_RANGE_SCALE
from qlite.core.numerics import dequantize_values
from qlite.core.numerics import fake_quant
from qlite.core.numerics import quantize_values
from qlite.core.numerics import scale_zero_point
from qlite.core.qarray import QArray
from qlite.core.qarray import dequantize
from qlite.core.qarray import quantize
from qlite.core.qtypes import NF4_LEVELS
from qlite.core.qtypes import QType
from qlite.core.qtypes import get_qtype
from qlite.core.stats import QuantStats

__all__ = [
    "CALIBRATION_METHODS",
    "CalibrationMethod",
    "NF4_LEVELS",
    "QArray",
    "QType",
    "QuantStats",
    "ZERO_RANGE_SCALE",
    "activation_range",
    "aggregate",
    "batch_stats",
    "check_finite",
    "dequantize",
    "dequantize_values",
    "fake_quant",
    "get_qtype",
    "quantize",
    "quantize_values",
    "register_calibration_method",
    "scale_zero_point",
]

CALIBRATION_METHODS: tuple[str, ...]  # documented only: __getattr__ serves it
"""Names of the registered calibration methods (``"minmax"``, ``"mse"``,
...), read from the registry when accessed, so methods registered later
(:func:`register_calibration_method`) are included."""


def __getattr__(name: str):
  # CALIBRATION_METHODS: a live view of the method registry (PEP 562)
  if name == "CALIBRATION_METHODS":
    return _calibration.CALIBRATION_METHODS
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
