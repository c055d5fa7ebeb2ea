"""Self-check of an export: the ``.tflite`` must compute what the fake-quant
model computes.

After conversion, :func:`check_export` runs the ``.tflite`` in LiteRT and the
fake-quant JAX model (the :class:`~qlite.litert.providers.ConversionProvider`
with the same stats and rules) on the example args and on the calibration
samples kept in the stats, and compares their outputs in LSB of each
output's scale. An output is faithful when it is within :data:`MAX_LSB` of
the fake-quant one, or not more than :data:`FAITHFUL_DB` further from the
float model than the fake-quant one is (int8 MEAN / AVERAGE_POOL_2D round
differently from the float fake-quant model, so outputs whose range is tiny
next to their inputs' can differ by more LSB while being as accurate). A
broken conversion (an all-zero output, an int32 bias overflow) is tens of dB
worse. The fuzzer (``tests/fuzz_models.py``) applies a stricter 3 dB over
more data.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import jax
import numpy as np

from qlite import metrics
from qlite.errors import ConversionError, QliteError
from qlite.litert import inspect as inspect_lib

MAX_LSB = 4.0
# Kept calibration rows (stats.samples) the check runs besides the example
# args: each row is one op-by-op evaluation of the fake-quant model.
SAMPLE_ROWS = 2
# On three rows, where the converter fuses an op that the fake-quant model
# rounds twice (a relu6 into an ADD, a MUL into a masked SELECT), a later
# softmax or LayerNorm can put LiteRT up to ~6 dB behind the fake-quant
# model while it is as accurate on more data (fuzz seeds 165 / 179 of the
# grown vocabulary). Broken conversions are 30+ dB behind (grouped weights
# read at one scale: 0.0 vs 43.2 dB; zero-point weights: 4.4 vs 38.8 dB).
FAITHFUL_DB = 10.0
MODES = ("error", "warn", "off")


@dataclasses.dataclass
class OutputCheck:
  """How one model output of the ``.tflite`` compares with the fake-quant
  model: ``max_lsb`` (max |LiteRT - fake-quant| in LSB of the output scale,
  NaN for a float output), SQNR of each against float when measured."""
  index: int
  max_lsb: float
  litert_vs_float_db: float | None = None
  fake_vs_float_db: float | None = None

  @property
  def faithful(self) -> bool:
    if self.max_lsb <= MAX_LSB:
      return True
    if self.litert_vs_float_db is None or self.fake_vs_float_db is None:
      return False
    return self.litert_vs_float_db >= self.fake_vs_float_db - FAITHFUL_DB

  def describe(self) -> str:
    s = f"output {self.index}: {self.max_lsb:.1f} LSB from the fake-quant model"
    if self.litert_vs_float_db is not None:
      s += (f", SQNR vs float {self.litert_vs_float_db:.1f} dB (fake-quant "
            f"{self.fake_vs_float_db:.1f} dB)")
    return s


def shares_batch_axis(arrays) -> bool:
  """True when every array has a leading axis of one common size (rows of
  one batch), False for scalars or differing sizes (a graph's nodes and
  edges)."""
  return len({np.shape(a)[0] if np.ndim(a) else None for a in arrays}) == 1 \
      and all(np.ndim(a) for a in arrays)


def _rows(args: Sequence[np.ndarray], shapes) -> list[tuple]:
  """Splits ``args`` (arrays with a leading batch axis, possibly another
  batch size than the export's) into tuples of the export's input shapes;
  ``args`` of exactly those shapes (e.g. a graph's nodes and edges, whose
  leading sizes differ) are one row; anything else gives no row."""
  if len(args) == len(shapes) and all(
      tuple(np.shape(a)) == tuple(s) for a, s in zip(args, shapes)):
    return [tuple(np.asarray(a) for a in args)]
  if not shares_batch_axis(args) or \
      len({s[0] if len(s) else None for s in shapes}) != 1:
    return []                    # no shared batch axis to split along
  n_export = shapes[0][0] if shapes and len(shapes[0]) else 1
  n = np.shape(args[0])[0] if np.ndim(args[0]) else 1
  if any(tuple(np.shape(a)[1:]) != tuple(s[1:]) for a, s in zip(args, shapes)):
    return []
  out = []
  for start in range(0, n - n_export + 1, max(n_export, 1)):
    out.append(tuple(np.asarray(a[start:start + n_export]) for a in args))
  return out


def check_export(blob: bytes, output_scales: Sequence[float | None],
                 fake_fn, float_fn, samples: Sequence[tuple],
                 input_shapes) -> list[OutputCheck]:
  """Runs ``blob`` and ``fake_fn`` on ``samples`` and returns one
  :class:`OutputCheck` per model output.

  Args:
    blob: the converted ``.tflite``.
    output_scales: each output's quantization scale (None: a float output).
    fake_fn: ``fake_fn(*flat_args)`` -> flat outputs of the fake-quant model.
    float_fn: same for the float model (run only when an output is off by
      more than :data:`MAX_LSB`).
    samples: tuples of flat input arrays (any leading batch size; split into
      the export's batch).
    input_shapes: the export's flat input shapes.
  """
  from qlite.litert.runtime import TFLiteRunner
  runner = TFLiteRunner(blob)
  rows = [r for s in samples for r in _rows(s, input_shapes)]
  lite, fake = [], []
  for row in rows:
    lite.append([np.asarray(o, np.float32) for o in runner.run(*row)])
    fake.append([np.asarray(o, np.float32) for o in fake_fn(*row)])
  checks = []
  for i, scale in enumerate(output_scales):
    a = np.stack([r[i] for r in lite])
    b = np.stack([r[i] for r in fake])
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    lsb = diff / scale if scale else (0.0 if diff == 0 else float("inf"))
    checks.append(OutputCheck(i, lsb))
  if any(not c.faithful for c in checks):
    ref = [[np.asarray(o, np.float32) for o in float_fn(*row)] for row in rows]
    for c in checks:
      r = np.stack([x[c.index] for x in ref])
      c.litert_vs_float_db = metrics.sqnr_db(
          r, np.stack([x[c.index] for x in lite]))
      c.fake_vs_float_db = metrics.sqnr_db(
          r, np.stack([x[c.index] for x in fake]))
  return checks


def report(checks: Sequence[OutputCheck], mode: str, what: str) -> None:
  """Raises ``ConversionError`` (mode "error") or warns (mode "warn") when
  an output is not faithful; the message names the outputs and the fix."""
  bad = [c for c in checks if not c.faithful]
  if not bad or mode == "off":
    return
  msg = (f"self-check failed: the converted {what} does not compute what "
         f"qlite's fake-quant model computes: "
         + "; ".join(c.describe() for c in bad)
         + ". This is a qlite or converter bug for this model: run "
         "qlite.compare(model, rules, stats, tflite, batches) to see the "
         "first diverging layer, keep that layer in float with a rule "
         "(act_qtype=None), and report it; export_tflite(..., verify='warn') "
         "returns the model anyway")
  if mode == "error":
    raise ConversionError(msg)
  warnings.warn("qlite: " + msg, UserWarning, stacklevel=5)


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise QliteError(f"verify must be one of {MODES}, got {mode!r}")
  return mode



def output_scales(info) -> list[float | None]:
  """Each model output's quantization scale (an int8 output's own, a float
  output's DEQUANTIZE input's), None for a float output."""
  made_by = {o: op for op in info.ops for o in op.outputs}
  scales = []
  for t in info.outputs:
    tensor = info.tensor(t)
    if tensor.scale is None and t in made_by and \
        made_by[t].name == "DEQUANTIZE":
      tensor = info.tensor(made_by[t].inputs[0])
    scales.append(float(tensor.scale[0]) if tensor.scale is not None
                  else None)
  return scales


def self_check(blob, qm, graph, plan, args, mode: str) -> None:
  """Runs the .tflite and the fake-quant model on the example args and the
  stats' kept samples; raises / warns per ``mode`` when they disagree."""
  flat_params = jax.tree.leaves(qm.mf.params)
  # Op by op, not jitted: jax's per-primitive compile cache makes this
  # cheaper than compiling the whole fake-quant model for one or two calls.
  fake_fn = qm.provider.function(graph, plan, flat_params)
  params = qm.mf.params

  def float_fn(*flat):
    a = jax.tree.unflatten(graph.args_tree, flat)
    return jax.tree.leaves(qm.mf.fn(params, *a))

  samples = [tuple(jax.tree.leaves(tuple(args)))]
  stats = qm.provider.stats
  if stats is not None and getattr(stats, "samples", None):
    kept = tuple(stats.samples)
    if shares_batch_axis(kept):                       # rows of a batch
      kept = tuple(a[:SAMPLE_ROWS] for a in kept)
    samples.append(kept)
  shapes = [tuple(graph.avals[v].shape) for v in graph.arg_vars]
  checks = check_export(
      blob, output_scales(inspect_lib.inspect_tflite(blob)), fake_fn,
      float_fn, samples, shapes)
  report(checks, mode, qm.mf.description)
