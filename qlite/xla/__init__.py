"""XLA PTQ backend: real quantized weights (QArray) and integer /
low-precision compute on CPU / GPU / TPU, driven by the same
``QuantizationRule``s and ``QuantStats`` as the ODML export."""

from qlite.xla.provider import (PtqProvider, PtqModel, QuantizedOp,
                                quantize_model, scale_source)
from qlite.xla.params import (abstract_quantized_params, quantize_params,
                              save_qparams, restore_qparams, param_bytes)
from qlite.xla.matmul import quantized_dot, quantized_conv

__all__ = ["PtqProvider", "PtqModel", "QuantizedOp", "quantize_model",
           "scale_source", "abstract_quantized_params", "quantize_params",
           "save_qparams", "restore_qparams", "param_bytes", "quantized_dot",
           "quantized_conv"]
