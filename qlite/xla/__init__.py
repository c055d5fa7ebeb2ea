"""XLA PTQ backend: real quantized weights (QArray) and integer /
low-precision compute on CPU / GPU / TPU, driven by the same
``QuantizationRule``s and ``QuantStats`` as the ODML export.

Entry points: :func:`quantize_model` with a :class:`PtqProvider` (run the
model quantized), :func:`abstract_quantized_params` and
:func:`quantize_params` (quantize the weights offline, whole tree or layer
by layer), :func:`save_qparams` / :func:`restore_qparams` (orbax).

Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> from qlite import xla
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> rules = [qlite.QuantizationRule(act_qtype=None)]      # weight-only
    >>> qm = xla.quantize_model(model, xla.PtqProvider(rules),
    ...                         variables=variables)
    >>> abstract = xla.abstract_quantized_params(model, rules, x,
    ...                                          variables=variables)
    >>> qparams = xla.quantize_params(variables, abstract)
    >>> qm.apply(qparams, x).shape
    (1, 4)
"""

from qlite.xla.provider import (PtqProvider, PtqModel, QuantizedOp,
                                quantize_model, scale_source)
from qlite.xla.params import (abstract_quantized_params, quantize_params,
                              save_qparams, restore_qparams, param_bytes)
from qlite.xla.matmul import quantized_dot, quantized_conv

__all__ = ["PtqProvider", "PtqModel", "QuantizedOp", "quantize_model",
           "scale_source", "abstract_quantized_params", "quantize_params",
           "save_qparams", "restore_qparams", "param_bytes", "quantized_dot",
           "quantized_conv"]
