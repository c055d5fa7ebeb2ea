"""Weight formats for float-activation LiteRT models (LMs): int8 / int4
weights, weight-only or dynamic-range, applied to a converted float
``.tflite`` (every signature) with ``ai-edge-quantizer`` (the ``[lm]``
extra).

Why that library: it is the maintained post-conversion quantizer of the
LiteRT stack; it writes exactly the tensor forms LiteRT's kernels read
(per-channel int8 / int4 constants, blockwise int4 with its scale tensors,
DEQUANTIZE for weight-only, hybrid FULLY_CONNECTED / EMBEDDING_LOOKUP for
dynamic range), keeps a weight shared by several ops or signatures as one
buffer, and handles multi-signature files. qlite's own static path
(:func:`qlite.export_tflite`) stays the one for full-integer models.

Formats (``FORMATS``):

- ``"float"``: unchanged.
- ``"int8"``: int8 weights per output channel, DEQUANTIZE'd to float before
  each op (weight-only: float compute, smaller file).
- ``"int8_dynamic"``: int8 weights per channel, activations quantized at run
  time by LiteRT's hybrid kernels (dynamic range).
- ``"int4"`` / ``"int4_dynamic"``: the same with int4 weights per channel.
- ``"int4_block32"``, ``"int4_block64"``, ``"int4_block128"``: int4 weights
  with one scale per block of 32 / 64 / 128 input values, dynamic range
  (the quantizer writes blockwise weights for dynamic range only: its
  weight-only blockwise recipe leaves the model unchanged, measured).
"""

from __future__ import annotations

import contextlib
import io
import logging

from qlite.errors import QliteError

# name: (bits, dynamic, granularity)
_SPECS = {
    "float": None,
    "int8": (8, False, "CHANNELWISE"),
    "int8_dynamic": (8, True, "CHANNELWISE"),
    "int4": (4, False, "CHANNELWISE"),
    "int4_dynamic": (4, True, "CHANNELWISE"),
    "int4_block32": (4, True, "BLOCKWISE_32"),
    "int4_block64": (4, True, "BLOCKWISE_64"),
    "int4_block128": (4, True, "BLOCKWISE_128"),
}
FORMATS: tuple = tuple(_SPECS)


def check_format(fmt: str) -> None:
  """Raises QliteError unless ``fmt`` is one of :data:`FORMATS`."""
  if fmt not in _SPECS:
    raise QliteError(f"unknown weight format {fmt!r}; valid: "
                     f"{', '.join(FORMATS)}")


def _quantizer():
  try:
    from ai_edge_quantizer import quantizer, qtyping, recipe_manager
  except ImportError as e:
    raise QliteError(
        f"int8 / int4 weight formats need ai-edge-quantizer: pip install "
        f"'qlite[lm]' (import failed: {e})") from None
  return quantizer, qtyping, recipe_manager


def recipe(fmt: str) -> list:
  """The ``ai-edge-quantizer`` recipe of weight format ``fmt`` (every
  supported op: FULLY_CONNECTED, EMBEDDING_LOOKUP, BATCH_MATMUL with a
  constant operand...).

  Raises:
    QliteError: unknown format, ``"float"``, or the library is missing.
  """
  check_format(fmt)
  spec = _SPECS[fmt]
  if spec is None:
    raise QliteError("the float format has no quantization recipe")
  _, qtyping, recipe_manager = _quantizer()
  bits, dynamic, gran = spec
  rm = recipe_manager.RecipeManager()
  add = rm.add_dynamic_config if dynamic else rm.add_weight_only_config
  add(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
      num_bits=bits, granularity=qtyping.QuantGranularity[gran])
  return rm.get_quantization_recipe()


def apply(blob: bytes, fmt: str) -> bytes:
  """Returns float ``.tflite`` ``blob`` with its weights in format ``fmt``
  (``"float"`` returns ``blob``).

  Raises:
    QliteError: unknown format, or ai-edge-quantizer is not installed.
    ConversionError: the quantizer failed on the model.
  """
  from qlite.errors import ConversionError
  check_format(fmt)
  if _SPECS[fmt] is None:
    return blob
  quantizer, _, _ = _quantizer()
  rec = recipe(fmt)
  quiet = io.StringIO()
  level = logging.getLogger().level
  try:
    logging.getLogger().setLevel(logging.WARNING)
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
      q = quantizer.Quantizer(bytearray(blob), rec)
      out = q.quantize(enable_progress_bar=False,
                       enable_progress_report=False).quantized_model
  except QliteError:
    raise
  except Exception as e:
    raise ConversionError(f"ai-edge-quantizer failed to apply weight format "
                          f"{fmt!r}: {type(e).__name__}: {e}") from e
  finally:
    logging.getLogger().setLevel(level)
  if out is None:
    raise ConversionError(f"ai-edge-quantizer returned no model for weight "
                          f"format {fmt!r}")
  return bytes(out)
