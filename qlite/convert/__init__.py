"""jax.export -> StableHLO -> litert-converter -> .tflite; and inspection."""

from qlite.convert.inspect import TFLiteInfo, TensorInfo, OpInfo, inspect_tflite
from qlite.convert.litert import (convert_function, convert_stablehlo,
                                  set_int8_io, stablehlo_bytecode,
                                  stablehlo_text, write_atomic)

__all__ = ["TFLiteInfo", "TensorInfo", "OpInfo", "inspect_tflite",
           "convert_function", "convert_stablehlo", "set_int8_io",
           "stablehlo_bytecode", "stablehlo_text", "write_atomic"]
