"""Weight quantization as the LiteRT export does it (per output channel,
symmetric, narrow range), and running one layer's op on given operands."""

from __future__ import annotations

import numpy as np

from qlite.core import numerics
from qlite.core.qtypes import get_qtype
from qlite.litert import fake_quant as fq
from qlite.trace import graph as graph_lib


def grid(w: np.ndarray, spec) -> tuple[np.ndarray, float]:
  """Returns ``(scale, qmax)`` of weight ``w`` under ``spec``'s rule:
  ``scale`` keepdims along the channel axis (absmax, narrow range)."""
  s, _ = fq.channel_scale(np.asarray(w, np.float32), spec.rule.weight_qtype,
                          spec.channel_axis, "absmax")
  return np.asarray(s, np.float32), float(get_qtype(spec.rule.weight_qtype).qmax)


def quantized(w: np.ndarray, spec) -> np.ndarray:
  """The weight as the fake-quant model (and the ``.tflite``) holds it."""
  method = spec.rule.weight_calibration_method
  s, z = fq.weight_scale(w, spec.rule.weight_qtype, spec.channel_axis, method)
  shape = [1] * np.ndim(w)
  shape[spec.channel_axis] = -1
  return np.asarray(numerics.fake_quant(
      np.asarray(w, np.float32), s.reshape(shape), z.reshape(shape),
      spec.rule.weight_qtype, narrow_range=method == "absmax"), np.float32)


def apply(layer, x, w):
  """Runs ``layer``'s op on activation ``x`` and weight ``w``."""
  invals = [None, None]
  invals[layer.act_operand] = x
  invals[layer.weight_operand] = w
  return graph_lib.bind(layer.node, invals)[0]
