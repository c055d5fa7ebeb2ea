"""Pallas kernels (with XLA fallbacks) for quantized matmuls."""

from qlite.kernels.matmul import (dispatch, w8a8_matmul, w8a8_matmul_xla,
                                  weight_only_matmul, weight_only_matmul_xla)

__all__ = ["dispatch", "w8a8_matmul", "w8a8_matmul_xla", "weight_only_matmul",
           "weight_only_matmul_xla"]
