"""The errors qlite raises. Every error a user can cause is a :class:`QliteError`."""

from __future__ import annotations


class QliteError(ValueError):
  """Base class of every error a user can cause (a ``ValueError``).

  Raised as such for a bad argument no subclass covers (not a Flax model, a
  Linen model without ``variables``, a dynamic input shape, an unwritable
  output path, ``.tflite`` inputs of the wrong number or shape); fix what the
  message names. ``except qlite.QliteError`` catches every qlite error.
  """


class QTypeError(QliteError):
  """An unknown quantization type, or one a backend cannot run.

  Raised for a qtype name that does not exist (``weight_qtype="int9"``) or
  one LiteRT has no integer kernel for (``act_qtype="fp8_e4m3"`` in
  :func:`qlite.export_tflite`); fix: use a name the message lists
  (``"int8"`` for LiteRT).
  """


class RuleError(QliteError):
  """A malformed :class:`qlite.QuantizationRule` (bad regex, bad field).

  Raised by ``QuantizationRule(...)`` (a regex that does not compile, an
  unknown calibration method or aggregation, ``"fixed"`` without
  ``act_fixed_range``) and when ``rules`` holds something else than rules;
  fix the field the message names.
  """


class CalibrationError(QliteError):
  """Calibration data or a calibration statistics object is unusable.

  Raised for empty, differently shaped or NaN / Inf calibration batches, an
  unknown calibration method, stats with no record for a boundary or from
  another model, and an unreadable stats file; fix: calibrate this model
  with these rules on finite data, and pass those stats.
  """


class ConversionError(QliteError):
  """``jax.export``, the LiteRT converter or loading the converted model failed.

  The message carries the underlying error (e.g. a non-finite quantization
  scale from NaN / Inf weights, a value ``jax.export`` cannot lower); fix
  the construct it names.
  """


class UnsupportedOpError(ConversionError):
  """An op has no full-integer LiteRT kernel (raised by strict export).

  Raised by ``export_tflite(strict=True)`` naming the LiteRT op, jax op,
  module path and source line; fix: cover the op with a rule
  (``act_qtype="int8"``), replace it, or pass ``strict=False`` to accept
  the float island.
  """


class TFLiteFormatError(QliteError):
  """A file or byte string is not a readable ``.tflite`` flatbuffer.

  Raised by :func:`qlite.inspect_tflite` for a missing path, a directory, or
  data that is not a complete TFLite flatbuffer; fix: pass the path or the
  bytes of a ``.tflite`` file.
  """
