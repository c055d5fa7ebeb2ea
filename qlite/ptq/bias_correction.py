"""Bias correction: removes the mean output error each quantized layer adds.

For every conv / dense layer followed by a per-channel bias (or a BatchNorm,
whose running mean plays that role) the expected output of the layer with
its int8 weight is compared with the same layer with its float weight, both
on the layer's inputs in the fake-quant model over the calibration batches;
the difference per output channel (the bias the weight rounding adds) is
subtracted from the bias (added to the BatchNorm mean). The weights are
unchanged. Only the layer's own error is corrected: a shift its input
carries from earlier layers is theirs to correct (correcting it again
over-corrects deep networks: MobileNetV2 lost 2.6 dB that way).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qlite.ptq import _graph, _weights


def correct(graph, plan, provider, layers, leaves: list, batches,
            report: list, reference: list | None = None) -> list:
  """Returns new flat params with the biases corrected (``report`` gets one
  line per layer). ``reference``: the flat params whose weights the
  quantized ones stand for (default ``leaves``; AdaRound passes the weights
  before its rounding)."""
  layers = [l for l in layers if l.shift is not None]
  if not layers:
    report.append("bias_correction: no layer with a per-channel bias or "
                  "BatchNorm after it")
    return leaves
  acts = [l.node.inputs[l.act_operand] for l in layers]
  fq_fn = _graph.fake_quant_capture(provider, graph, plan, leaves, acts)
  wq = [_weights.quantized(leaves[l.param], l.spec) for l in layers]
  ref = leaves if reference is None else reference
  w = [np.asarray(ref[l.param], np.float32) for l in layers]

  @jax.jit
  def shifts(xs_q):
    out = []
    for l, xq, a, b in zip(layers, xs_q, w, wq):
      d = _weights.apply(l, xq, b - a)
      out.append(jnp.mean(d.reshape(-1, d.shape[-1]), axis=0))
    return out

  total = None
  for batch in batches:
    args = _graph.flat_args(batch)
    d = shifts(fq_fn(*args))
    total = d if total is None else [t + x for t, x in zip(total, d)]
  leaves = list(leaves)
  for l, t in zip(layers, total):
    delta = np.asarray(t, np.float32) / len(batches)
    p, sign = l.shift
    leaves[p] = (np.asarray(leaves[p], np.float32) + sign * delta).astype(
        np.asarray(leaves[p]).dtype)
    report.append(f"bias_correction: {l.name}: mean |shift| "
                  f"{np.mean(np.abs(delta)):.3g}")
  return leaves
