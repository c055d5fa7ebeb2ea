"""The one-call pipeline: calibrate -> export_tflite, plus the float export."""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from qlite.litert.providers import CalibrationProvider, ConversionProvider
from qlite.quant.scales import as_quant_stats, range_warnings
from qlite.litert import inspect as inspect_lib
from qlite.litert import convert as litert
from qlite.litert import verify as verify_lib
from qlite.core import calibration
from qlite.core.stats import QuantStats
from qlite.errors import (CalibrationError, ConversionError, QliteError,
                          UnsupportedOpError)
from qlite.ops import int_lookup
from qlite.trace import graph as graph_lib
from qlite.quant import fingerprint
from qlite.quant.batches import describe_bad_batch
from qlite.quant.provider import QuantizedModel
from qlite.rules import QuantizationRule


def _as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def plan_fingerprint(keys: Iterable[str]) -> str:
  """A short hash of a model's boundary keys (identifies the model's graph)."""
  return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def _shapes(args) -> list:
  return [tuple(np.shape(x)) for x in jax.tree.leaves(tuple(args))]


def _check_batch(first_shapes, args, n: int):
  """Raises a named error when batch ``n`` differs in shape from the first
  batch or holds NaN / Inf."""
  shapes = _shapes(args)
  if len(shapes) != len(first_shapes):
    raise CalibrationError(f"calibration batch {n} has {len(shapes)} arrays, "
                           f"the first batch had {len(first_shapes)}")
  for i, (s, f) in enumerate(zip(shapes, first_shapes)):
    if s != f:
      raise CalibrationError(
          f"calibration batch {n}: argument {i} has shape {s}, the first "
          f"batch had {f}; every batch must have the same shapes")
  for i, x in enumerate(jax.tree.leaves(tuple(args))):
    arr = np.asarray(x)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
      raise CalibrationError(f"calibration batch {n}: argument {i} contains "
                             f"NaN or Inf; clean the calibration data")


def check_static_shapes(args, what: str):
  """Raises QliteError when an example arg has a dynamic / unknown dim."""
  for i, x in enumerate(jax.tree.leaves(tuple(args))):
    shape = getattr(x, "shape", None)
    if shape is None:
      shape = np.shape(x)
    if any(not isinstance(d, (int, np.integer)) for d in shape):
      raise QliteError(
          f"{what}: argument {i} has a dynamic shape {tuple(shape)}; LiteRT "
          f"models have static shapes: pass a concrete example (e.g. batch "
          f"size 1)")
    dtype = np.dtype(getattr(x, "dtype", np.asarray(x).dtype))
    if dtype.name in ("bfloat16", "float16"):    # (float64: jax makes f32)
      raise QliteError(
          f"{what}: argument {i} is {dtype.name}; a LiteRT model's float "
          f"inputs are float32 (int8 with io_dtype='int8'): pass float32 "
          f"arrays (e.g. x.astype(np.float32)); a cast inside the model "
          f"stays as the model wrote it")


CALIBRATION_ENGINES = ("auto", "litert", "xla")
# From this many parameter bytes the LiteRT calibration model takes its
# weights as inputs instead of constants (peak memory: the converter's float
# conversion of a 64 MiB model held ~5.9x the weights). Below it the weights
# stay constants, so XNNPACK packs them once (faster batches).
CALIBRATION_WEIGHTS_AS_INPUTS_BYTES = 16 << 20


def _litert_calibration_step(qm, provider, graph, plan):
  """Returns ``step(flat_args)`` that runs a float ``.tflite`` of the model
  whose outputs are the boundary values, and records their statistics.

  Converting the float graph replaces the XLA compile of a jitted
  calibration step, the bottleneck of a short calibration.
  Raises ConversionError when the float model cannot be converted.
  """
  from qlite.litert.runtime import TFLiteRunner
  bounds = [b for b in plan.boundaries.values() if b.calibrated]
  flat_params = jax.tree.leaves(qm.mf.params)
  folded = graph_lib.fold_static(graph, flat_params)
  probes = list(plan.probes.items())   # integers lookup tables read
  sub = dataclasses.replace(graph, out_vars=[b.var for b in bounds] +
                            [v for v, _ in probes])

  def fn(*flat_args):
    return graph_lib.evaluate(sub, flat_params, flat_args, preset=folded)
  avals = [jax.ShapeDtypeStruct(graph.avals[v].shape, graph.avals[v].dtype)
           for v in graph.arg_vars]
  holder = [fn]   # handed over: the folded weights go before conversion
  del fn
  weight_bytes = sum(getattr(p, "nbytes", 0) for p in flat_params)
  if weight_bytes >= CALIBRATION_WEIGHTS_AS_INPUTS_BYTES:
    blob, weights = litert.convert_function_weights_as_inputs(
        holder, avals, num_outputs=len(sub.out_vars))
  else:
    blob, weights = litert.convert_function(
        holder, avals, quantized=False, num_outputs=len(sub.out_vars)), []
  runner = TFLiteRunner(blob)
  runner.set_fixed_inputs(weights)
  del weights
  pct = [provider.needs_percentiles(b) for b in bounds]
  hist = [provider.needs_histogram(b) for b in bounds]

  def step(flat_args):
    outs = runner.run(*[np.asarray(a) for a in flat_args])
    stats = {b.key: calibration.batch_stats(np.asarray(o), with_percentiles=p,
                                            with_histogram=h)
             for b, o, p, h in zip(bounds, outs, pct, hist)}
    for (_, key), o in zip(probes, outs[len(bounds):]):
      stats[key] = int_lookup.probe_stats(np.asarray(o))
    provider.record(plan, stats)
  return step


def calibrate(model, rules: Sequence[QuantizationRule], batches: Iterable[Any],
              variables=None, method: str = "minmax", *,
              progress: bool = True, max_batches: int | None = None,
              engine: str = "auto") -> QuantStats:
  """Runs ``model`` on calibration batches and returns activation statistics.

  The statistics (min / max and the others the calibration methods read)
  are recorded at every quantization boundary of the plan, keyed by module
  path and op (e.g. ``"Dense_0/dot_general"``; ``"input0"`` for the first
  model input). They set the static activation scales of
  :func:`export_tflite` and of ``qlite.xla.PtqProvider``.

  Args:
    model: a ``flax.linen.Module`` (pass ``variables``) or a
      ``flax.nnx.Module`` (it carries its own state: leave ``variables``
      None).
    rules: the :class:`qlite.QuantizationRule` list (or one rule); the first
      rule whose ``module_path`` matches an op applies. A rule that matches
      no op is reported with a ``UserWarning``.
    batches: an iterable of arrays, or of tuples / lists of positional
      arrays. Every batch must have the static shapes of the first.
    variables: the Linen variables (``model.init(...)`` or trained ones);
      None for NNX.
    method: how statistics become ranges at export for rules that leave
      ``act_calibration_method=None``: a registered calibration method
      (``"minmax"``, ``"absmax"``, ``"rms"``, ``"percentile"``, ``"mse"``,
      ``"quantile"``, ...). Stored as ``stats.meta["method"]``.
    progress: show a progress bar.
    max_batches: stop after this many batches (None: all of them).
    engine: ``"litert"`` runs a float ``.tflite`` of the model that outputs
      every boundary (no XLA compile: fastest for a few dozen batches),
      ``"xla"`` a jitted JAX step; ``"auto"`` uses LiteRT and falls back to
      XLA when the float model does not convert. Both give the same
      statistics.

  Returns:
    A :class:`QuantStats` with one record per boundary; its ``meta`` holds
    ``num_batches``, ``method``, ``model`` and a ``fingerprint`` of the
    boundaries that :func:`export_tflite` checks.

  Raises:
    CalibrationError: ``batches`` is empty; a batch has another number of
      arrays or other shapes than the first, or holds NaN / Inf (so does an
      activation); unknown ``method`` or ``engine``.
    RuleError: an element of ``rules`` is not a ``QuantizationRule``.
    ConversionError: ``engine="litert"`` and the float model does not
      convert to ``.tflite``.
    QliteError: ``model`` is not a Flax module; a Linen model without
      ``variables`` (or an NNX one with); a batch with a dynamic shape;
      tracing the model on the first batch failed (e.g. an input shape that
      does not fit the params).

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> batches = [np.random.rand(1, 8).astype(np.float32) for _ in range(8)]
    >>> stats = qlite.calibrate(model, [qlite.QuantizationRule()], batches,
    ...                         variables=variables, progress=False)
    >>> stats
    QuantStats(2 records, 8 batches, method='minmax')
    >>> sorted(stats.keys())
    ['dot_general', 'input0']
  """
  if engine not in CALIBRATION_ENGINES:
    raise CalibrationError(f"calibrate: engine must be one of "
                           f"{CALIBRATION_ENGINES}, got {engine!r}")
  provider = CalibrationProvider(rules, method=method)
  qm = QuantizedModel(model, provider, variables)
  if qm.mf.params is None:
    raise QliteError(f"{qm.mf.description} is a Linen module: pass "
                     f"variables=...")
  # On the device once, not re-sent with every batch.
  qm.mf.params = jax.device_put(qm.mf.params)
  it = iter(batches)
  total = None
  if hasattr(batches, "__len__"):
    total = len(batches)  # type: ignore[arg-type]
  if max_batches is not None:
    total = min(total, max_batches) if total is not None else max_batches
  first_shapes = None
  step = None
  bar = tqdm(total=total, desc="qlite calibrate", unit="batch",
             disable=not progress, leave=False)
  n = 0
  for batch in it:
    if max_batches is not None and n >= max_batches:
      break
    problem = describe_bad_batch(batch, what=f"calibration batch {n}")
    if problem:
      raise CalibrationError(problem)
    args = _as_args(batch)
    if first_shapes is None:
      check_static_shapes(args, "calibration batch 0")
      first_args = args
      first_shapes = _shapes(args)
    _check_batch(first_shapes, args, n)
    if step is None:
      graph, plan = qm.traced(args)
      step = lambda a: qm(*a)
      if engine != "xla":
        try:
          lite = _litert_calibration_step(qm, provider, graph, plan)
          step = lambda a: lite(jax.tree.leaves(tuple(a)))
        except QliteError:     # does not convert, or LiteRT cannot load it
          if engine == "litert":
            raise
    step(args)
    n += 1
    bar.update(1)
  bar.close()
  if n == 0:
    raise CalibrationError("calibrate: `batches` is empty; pass at least one "
                           "batch of representative inputs")
  provider.matcher.warn_unmatched()
  stats = provider.stats
  plan = qm.traced(_as_args(batch))[1]
  stats.meta["fingerprint"] = plan_fingerprint(
      b.key for b in plan.boundaries.values())
  stats.meta["model"] = qm.mf.description
  fingerprint.record(stats.meta, qm.mf.params)
  stats.samples = _kept_samples(first_args)
  return stats


# Calibration rows kept in the stats for the export's self-check
# (qlite.litert.verify runs some of them).
SAMPLE_ROWS = 4
SAMPLE_MAX_BYTES = 1 << 20


def _kept_samples(args) -> list[np.ndarray]:
  """Up to SAMPLE_ROWS rows of the first calibration batch (flat arrays),
  none when they would exceed SAMPLE_MAX_BYTES or have no batch axis."""
  flat = [np.asarray(a) for a in jax.tree.leaves(tuple(args))]
  if not flat or any(a.ndim == 0 for a in flat):
    return []
  if verify_lib.shares_batch_axis(flat):
    n = min(SAMPLE_ROWS, flat[0].shape[0])
    rows = [np.ascontiguousarray(a[:n]) for a in flat]
  else:                      # e.g. nodes and edges: keep the whole example
    rows = [np.ascontiguousarray(a) for a in flat]
  return rows if sum(r.nbytes for r in rows) <= SAMPLE_MAX_BYTES else []


def _export_function(model, rules, stats, example_args, variables,
                     allow_changed_weights: bool = False):
  stats = as_quant_stats(stats) if stats is not None else None
  provider = ConversionProvider(rules, stats)
  qm = QuantizedModel(model, provider, variables)
  if qm.mf.params is None:
    raise QliteError(f"{qm.mf.description} is a Linen module: pass "
                     f"variables=...")
  problem = describe_bad_batch(example_args, what="example_args")
  if problem:
    raise QliteError(problem)
  args = _as_args(example_args)
  check_static_shapes(args, "example_args")
  if stats is not None and stats.meta.get("model") not in (
      None, qm.mf.description):
    raise CalibrationError(
        f"the stats were calibrated on {stats.meta['model']}, but the model "
        f"being exported is {qm.mf.description}: calibrate this model")
  if stats is not None:
    fingerprint.check_stats_fit(stats.meta, qm.mf.params, qm.mf.description,
                                allow_changed_weights=allow_changed_weights)
  graph, plan = qm.traced(args)
  poor = range_warnings(plan, stats)
  if poor:
    warnings.warn("qlite: calibrated ranges int8 cannot use well:\n  " +
                  "\n  ".join(poor), UserWarning, stacklevel=4)
  fn = provider.function(graph, plan, jax.tree.leaves(qm.mf.params))
  return qm, graph, plan, fn, args


def export_tflite(model, rules: Sequence[QuantizationRule] | None = None,
                  stats=None, example_args=None, variables=None, path=None,
                  io_dtype: str = "float32", *, strict: bool = True,
                  verify: str = "error",
                  allow_changed_weights: bool = False,
                  signatures=None, weights: str = "float") -> bytes:
  """Exports a full-integer LiteRT ``.tflite`` and returns its bytes.

  Weights are quantized per output channel (symmetric), activations per
  tensor with the ranges from ``stats``, under the same plan as
  calibration. The result is checked to load in LiteRT; the same model,
  rules and stats give the same bytes.

  Args:
    model: the ``flax.linen.Module`` or ``flax.nnx.Module`` that was
      calibrated.
    rules: the :class:`qlite.QuantizationRule` list used to calibrate.
    stats: a :class:`QuantStats` (from :func:`calibrate` or
      :meth:`QuantStats.load`), or a QAT ``quant_stats`` collection (or QAT
      variables holding one).
    example_args: an array, or a tuple of positional arrays, with the input
      shapes and dtypes of the exported model (static shapes, e.g. batch
      size 1); the values are not used.
    variables: the Linen variables; None for NNX.
    path: if given, the file is also written there, atomically (no partial
      file on failure).
    io_dtype: ``"float32"`` (float model inputs / outputs, QUANTIZE /
      DEQUANTIZE inside) or ``"int8"`` (int8 inputs / outputs; their scale
      and zero point are in the file).
    strict: raise :class:`UnsupportedOpError` when any compute op is left in
      float; False exports such a model with a ``UserWarning``.
    verify: after conversion, run the ``.tflite`` in LiteRT beside the
      fake-quant model on ``example_args`` and on the calibration rows kept
      in ``stats.samples``: ``"error"`` raises when an output is not
      faithful to the fake-quant one, ``"warn"`` warns, ``"off"`` skips the
      check.
    allow_changed_weights: use ``stats`` although the weights differ from
      those it was calibrated with (same parameter shapes and dtypes).
    signatures: ``{name: (fn, example_args)}`` exports one ``.tflite``
      with a named signature per entry sharing one copy of the weights
      (e.g. an LM's ``"prefill"`` and ``"decode"``); ``fn`` a method name
      of ``model`` or a callable. Float activations; ``rules``, ``stats``
      and ``example_args`` must be None
      (:func:`qlite.litert.signatures.export_signatures`).
    weights: with ``signatures``, the weight format
      (:data:`qlite.litert.weight_formats.FORMATS`: ``"float"``,
      ``"int8"``, ``"int8_dynamic"``, ``"int4"``, ``"int4_block32"``...).

  Returns:
    The ``.tflite`` flatbuffer bytes.

  Raises:
    CalibrationError: ``stats`` is not a statistics object, has no record
      for a boundary (names it), was calibrated on another model (names the
      parameters that differ), or on other weights (unless
      ``allow_changed_weights``).
    QTypeError: a rule's qtype has no LiteRT integer kernel (e.g. fp8).
    UnsupportedOpError: ``strict`` and an op stayed float (names the LiteRT
      op, jax op, module path and source line).
    ConversionError: ``jax.export`` or the converter failed, LiteRT cannot
      load the result, or (``verify="error"``) an output of the ``.tflite``
      is not faithful to the fake-quant model (names it).
    RuleError: an element of ``rules`` is not a ``QuantizationRule``.
    QliteError: a bad ``io_dtype`` or ``verify``, or ``io_dtype="int8"``
      with a non-float model input; a dynamic shape in ``example_args``; ``model`` is not a Flax
      module or ``variables`` do not fit it; tracing failed; ``path`` cannot
      be written.

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> rules = [qlite.QuantizationRule()]      # int8 weights and activations
    >>> stats = qlite.calibrate(model, rules, [x, -x], variables=variables,
    ...                         progress=False)
    >>> blob = qlite.export_tflite(model, rules, stats, x, variables=variables,
    ...                            path="model.tflite")
    >>> qlite.inspect_tflite(blob).full_integer
    True
  """
  if signatures is not None:
    if rules is not None or stats is not None or example_args is not None:
      raise QliteError(
          "export_tflite(signatures=...) exports float activations with the "
          "weight format weights=...: pass rules=None, stats=None, "
          "example_args=None (full-integer multi-signature export is not "
          "supported; export one function full-integer without signatures)")
    from qlite.litert import signatures as signatures_lib
    return signatures_lib.export_signatures(
        signatures, model=model, variables=variables, weights=weights,
        path=path)
  if weights != "float":
    raise QliteError(f"weights={weights!r} applies to export_tflite("
                     f"signatures=...) only; full-integer exports take "
                     f"their weight qtype from the rules")
  with litert.SigintWatch() as watch:
    blob = _export_tflite(model, rules, stats, example_args, variables,
                          io_dtype, strict, verify, allow_changed_weights)
    if path is not None:
      watch.check()     # a Ctrl-C jax swallowed: write nothing
      litert.write_atomic(path, blob)
  return blob


def _export_tflite(model, rules, stats, example_args, variables, io_dtype,
                   strict, verify, allow_changed_weights) -> bytes:
  if io_dtype not in litert.IO_DTYPES:
    raise QliteError(f"io_dtype must be one of {litert.IO_DTYPES}, got "
                     f"{io_dtype!r}")
  verify_lib.check_mode(verify)
  qm, graph, plan, fn, args = _export_function(
      model, rules, stats, example_args, variables, allow_changed_weights)
  if io_dtype == "int8":
    for i, var in enumerate(graph.arg_vars):
      if not np.issubdtype(np.dtype(graph.avals[var].dtype), np.floating):
        raise QliteError(f"io_dtype='int8' needs float model inputs; input "
                         f"{i} is {graph.avals[var].dtype}; use "
                         f"io_dtype='float32'")
  avals = [jax.ShapeDtypeStruct(graph.avals[v].shape, graph.avals[v].dtype)
           for v in graph.arg_vars]
  holder = [fn]   # handed over: the folded weights go before conversion
  del fn
  blob = litert.convert_function(holder, avals, quantized=True,
                                 num_outputs=len(graph.out_vars))
  info = inspect_lib.inspect_tflite(blob)
  if strict and not info.full_integer:
    raise UnsupportedOpError(inspect_lib.float_island_message(info, graph))
  if not info.full_integer:
    warnings.warn("qlite: the model is not full-integer:\n" +
                  inspect_lib.float_island_message(info, graph), UserWarning, stacklevel=3)
  if io_dtype == "int8":
    blob = litert.set_int8_io(blob)
  _verify_loads(blob)
  if verify != "off":
    verify_lib.self_check(blob, qm, graph, plan, args, verify)
  qm.provider.matcher.warn_unmatched()
  return blob



def _verify_loads(blob: bytes) -> None:
  """Raises ConversionError when LiteRT cannot load the model; warns when
  only the XNNPACK delegate refuses it."""
  from qlite.litert.runtime import TFLiteRunner
  try:
    runner = TFLiteRunner(blob)
  except QliteError as e:
    raise ConversionError(f"the converted model does not load in LiteRT: "
                          f"{e}") from None
  if runner.delegate_error:
    warnings.warn(f"qlite: LiteRT's XNNPACK delegate cannot prepare this "
                  f"model ({runner.delegate_error}); it runs with the builtin "
                  f"int8 kernels", UserWarning, stacklevel=3)



def export_float_tflite(model, example_args, variables=None,
                        path=None) -> bytes:
  """Exports the float model (no quantization) as ``.tflite`` bytes.

  The float baseline of :func:`export_tflite` (e.g. to compare size,
  latency or accuracy): same interface, float32 kernels.

  Args:
    model: a ``flax.linen.Module`` (pass ``variables``) or a
      ``flax.nnx.Module``.
    example_args: an array, or a tuple of positional arrays, fixing the
      input shapes and dtypes.
    variables: the Linen variables; None for NNX.
    path: if given, the file is also written there, atomically.

  Returns:
    The ``.tflite`` flatbuffer bytes.

  Raises:
    QliteError: ``model`` is not a Flax module; a Linen model without
      ``variables`` (or an NNX one with); ``path`` cannot be written.
    ConversionError: ``jax.export`` or the converter failed.

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> blob = qlite.export_float_tflite(model, x, variables=variables)
    >>> qlite.inspect_tflite(blob).op_histogram
    {'FULLY_CONNECTED': 1}
  """
  from qlite.trace.flax_hooks import model_function
  mf = model_function(model, variables)
  args = _as_args(example_args)
  flat_args, tree = jax.tree.flatten(args)

  def fn(*flat):
    return jax.tree.leaves(mf.fn(mf.params, *jax.tree.unflatten(tree, flat)))
  avals = [jax.ShapeDtypeStruct(np.shape(a), a.dtype if hasattr(a, "dtype")
                                else np.asarray(a).dtype) for a in flat_args]
  blob = litert.convert_function(fn, avals, quantized=False)
  if path is not None:
    litert.write_atomic(path, blob)
  return blob
