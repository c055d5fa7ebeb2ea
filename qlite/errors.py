"""The errors qlite raises. Every error a user can cause is a :class:`QliteError`."""

from __future__ import annotations


class QliteError(ValueError):
  """Base class of every error a user can cause (a ``ValueError``)."""


class QTypeError(QliteError):
  """An unknown quantization type, or one a backend cannot run."""


class RuleError(QliteError):
  """A malformed :class:`qlite.QuantizationRule` (bad regex, bad field)."""


class CalibrationError(QliteError):
  """Calibration data or a calibration statistics object is unusable."""


class ConversionError(QliteError):
  """Tracing, lowering or the LiteRT converter failed."""


class UnsupportedOpError(ConversionError):
  """An op has no full-integer LiteRT kernel (raised by strict export)."""


class TFLiteFormatError(QliteError):
  """A file or byte string is not a readable ``.tflite`` flatbuffer."""
