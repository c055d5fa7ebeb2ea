"""Run float JAX, qlite's fake-quant JAX and the LiteRT interpreter on the
same inputs and measure them against each other: :func:`compare`.

The fake-quant model is the same function qlite exports (``ConversionProvider``
with the same rules and stats), so LiteRT and fake-quant should agree within an
LSB or two at every boundary; where they do not, the converter or the runtime
computed something else. Float vs fake-quant shows what quantization costs.
Boundaries are matched to LiteRT tensors by :mod:`qlite.analysis.matching`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable

import jax
import numpy as np
from tqdm.auto import tqdm

from qlite.analysis import matching
from qlite.analysis.report import (LAYER_METRICS, PAIRS, LayerRow, OutputRow,
                                   PairMetrics, Report)
from qlite.core import numerics
from qlite.errors import QliteError, TFLiteFormatError
from qlite.litert import inspect as inspect_lib
from qlite.litert.providers import ConversionProvider
from qlite.litert.runtime import TFLiteRunner
from qlite.metrics import cosine, cosine_from_sums, sqnr_db, sqnr_db_from_power
from qlite.quant.batches import describe_bad_batch
from qlite.quant.provider import quantize_model
from qlite.quant.scales import as_quant_stats, boundary_scale
from qlite.trace import graph as graph_lib

if TYPE_CHECKING:
  from qlite.quant import plan as plan_lib

__all__ = ["compare", "check_tflite_fits", "check_io_fits"]

_SIDES = ("float", "fakequant", "litert")


def compare(model, rules, stats, tflite, batches: Iterable[Any],
            variables=None, *, progress: bool = True,
            keep_values: bool = False,
            num_threads: int | None = None) -> Report:
  """Compares float JAX, fake-quant JAX and LiteRT, end to end and per layer.

  Runs the float JAX model, qlite's fake-quant JAX model (same rules and
  stats as the export) and the LiteRT interpreter on ``batches``, and
  measures each against the others at the model outputs and at every
  activation boundary, keyed by Flax module path in graph order.

  Example usage::

    >>> stats = qlite.calibrate(model, rules, batches, variables=variables)
    >>> blob = qlite.export_tflite(model, rules, stats, batches[0],
    ...                            variables=variables)
    >>> report = qlite.compare(model, rules, stats, blob, batches,
    ...                        variables=variables)
    >>> print(report)
    >>> qlite.find_sensitive_layers(report, min_sqnr_db=30)

  Args:
    model: the Flax model (Linen module or NNX module) that was exported.
    rules: the quantization rules of the export.
    stats: the calibration stats of the export.
    tflite: the ``.tflite`` path, or the bytes from
      :func:`qlite.export_tflite`. Its inputs are batch-fixed; a batch with
      more rows is run in row chunks of the export batch.
    batches: an iterable of arrays, or of tuples of positional arrays.
    variables: the Linen variables (required for a Linen module).
    progress: show a progress bar over the batches.
    keep_values: store every layer's float / fake-quant / own / LiteRT
      values in ``report.values[key]`` (memory grows with the data).
    num_threads: LiteRT interpreter threads (default: its own).

  Returns:
    A :class:`~qlite.analysis.report.Report`: one row per model output and
    one per activation boundary.

  Raises:
    QliteError: no batches, a dict batch or a flag (bool) in a batch,
      batch shapes the .tflite cannot take, a Linen model without
      ``variables``, or a ``.tflite`` exported from another model (its
      outputs, activations or weights do not fit the model: the message
      names the file and what differs).
    CalibrationError: ``stats`` lack a boundary of this model and rules.
    TFLiteFormatError: ``tflite`` is not a readable .tflite model.
  """
  blob, tflite_name = _read_blob(tflite)
  info = inspect_lib.inspect_tflite(blob)
  stats = as_quant_stats(stats) if stats is not None else None
  provider = ConversionProvider(rules, stats)
  qm = quantize_model(model, provider, variables=variables)
  if qm.mf.params is None:
    raise QliteError(f"{qm.mf.description} is a Linen module: pass "
                     f"variables=...")
  flat_params = jax.tree.leaves(qm.mf.params)
  runner = TFLiteRunner(blob, preserve_all_tensors=True,
                        num_threads=num_threads)
  in_shapes = [tuple(int(d) for d in d_["shape"]) for d_ in
               runner.input_details]

  total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore
  bar = tqdm(total=total, desc="qlite compare", unit="batch",
             disable=not progress, leave=False)
  run = None
  num_samples = num_batches = 0
  try:
    for num_batches, batch in enumerate(batches, start=1):
      problem = describe_bad_batch(batch,
                                   what=f"compare: batch {num_batches - 1}")
      if problem is not None:
        raise QliteError(problem)
      flat = jax.tree.leaves(_as_args(batch))
      for chunk in _chunks(flat, in_shapes, num_batches - 1, tflite_name):
        if run is None:
          run = _prepare(qm, provider, chunk, flat_params, info, stats,
                         keep_values)
          check_tflite_fits(info, run.graph, run.plan, run.matched,
                            tflite_name, qm.mf.description, run.scales)
        _run_chunk(run, chunk, runner)
        num_samples += 1
      bar.update(1)
  finally:
    bar.close()
  if run is None:
    raise QliteError("compare: `batches` is empty; pass at least one batch "
                     "of inputs")
  return _build_report(run, qm.mf.description, tflite_name, num_samples,
                       num_batches)


# --------------------------------------------------------------------------
# Metrics.

class _Accumulator:
  """Running sums for :class:`PairMetrics` over chunks (float64)."""

  def __init__(self):
    self.n = 0
    self.sum_abs = 0.0
    self.max_abs = 0.0
    self.ref_sq = 0.0
    self.test_sq = 0.0
    self.err_sq = 0.0
    self.dot = 0.0

  def add(self, ref, test):
    ref = np.asarray(ref, np.float64).ravel()
    test = np.asarray(test, np.float64).ravel()
    err = ref - test
    self.n += ref.size
    if ref.size:
      self.max_abs = max(self.max_abs, float(np.max(np.abs(err))))
    self.sum_abs += float(np.sum(np.abs(err)))
    self.ref_sq += float(ref @ ref)
    self.test_sq += float(test @ test)
    self.err_sq += float(err @ err)
    self.dot += float(ref @ test)

  def result(self) -> PairMetrics:
    return PairMetrics(self.max_abs, self.sum_abs / max(self.n, 1),
                       sqnr_db_from_power(self.ref_sq, self.err_sq),
                       cosine_from_sums(self.dot, self.ref_sq, self.test_sq))


def _pair_metrics(ref: np.ndarray, test: np.ndarray) -> PairMetrics:
  ref = np.asarray(ref, np.float64)
  test = np.asarray(test, np.float64)
  err = np.abs(ref - test)
  top1 = None
  if ref.ndim >= 1 and ref.shape[-1] > 1:
    top1 = float(np.mean(np.argmax(ref, -1) == np.argmax(test, -1)))
  return PairMetrics(float(err.max()) if err.size else 0.0,
                     float(err.mean()) if err.size else 0.0,
                     sqnr_db(ref, test), cosine(ref, test), top1)


# --------------------------------------------------------------------------
# The run.

@dataclasses.dataclass
class _Output:
  """A model output of the .tflite."""
  index: int
  shape: tuple[int, ...]
  scale: float | None             # None: float output


@dataclasses.dataclass
class _Run:
  """What one :func:`compare` call sets up on its first chunk and
  accumulates over all chunks. Boundaries are keyed by graph var."""
  graph: graph_lib.Graph          # traced on the chunk shape
  plan: plan_lib.Plan
  boundaries: list                # boundary vars, in graph order
  scales: dict[Any, tuple[np.ndarray, np.ndarray]]   # (scale, zero point)
  matched: dict[Any, tuple[inspect_lib.TensorInfo | None, str]]
  explorer_keys: dict[Any, str]
  float_fn: Callable              # (flat params, args) -> outs + boundaries
  fq_fn: Callable                 # (*args) -> outs + boundaries
  flat_params: list
  outputs: list[_Output]
  keep_values: bool
  # side -> output index -> per-chunk values
  out_vals: dict[str, list[list[np.ndarray]]] = dataclasses.field(init=False)
  # var -> metric -> running sums
  accs: dict[Any, dict[str, _Accumulator]] = dataclasses.field(init=False)
  lsb: dict[Any, float] = dataclasses.field(default_factory=dict)
  # var -> side -> per-chunk values (keep_values only)
  kept: dict[Any, dict[str, list[np.ndarray]]] = dataclasses.field(
      default_factory=dict)

  def __post_init__(self):
    self.out_vals = {side: [[] for _ in self.outputs] for side in _SIDES}
    self.accs = {v: {k: _Accumulator() for k in LAYER_METRICS}
                 for v in self.boundaries}


def _prepare(qm, provider, chunk, flat_params, info, stats,
             keep_values: bool) -> _Run:
  """Traces on the chunk shape, builds the jitted float / fake-quant
  functions (model outputs followed by every boundary value) and matches
  boundaries to LiteRT tensors."""
  args = tuple(chunk)
  graph, plan = qm.traced(args)
  if len(jax.tree.leaves(args)) != len(graph.arg_vars):
    raise QliteError(f"compare: the model takes {len(graph.arg_vars)} array "
                     f"inputs, the batches give {len(chunk)}")
  bvars = list(plan.boundaries)
  probe = dataclasses.replace(graph, out_vars=list(graph.out_vars) + bvars)
  fq_fn = jax.jit(provider.function(probe, plan, flat_params))
  float_fn = jax.jit(lambda p, a: graph_lib.evaluate(probe, p, a))
  scales = {v: boundary_scale(b, stats) for v, b in plan.boundaries.items()}
  matched = matching.match_tensors(info, graph, plan, scales)
  n_out = len(graph.out_vars)
  outputs = [_Output(i, tuple(info.tensors[t].shape),
                     matching.output_scale(info, t))
             for i, t in enumerate(info.outputs[:n_out])]
  return _Run(
      graph=graph, plan=plan, boundaries=bvars, scales=scales,
      matched=matched, explorer_keys=matching.explorer_keys(info, matched),
      float_fn=float_fn, fq_fn=fq_fn,
      flat_params=flat_params, outputs=outputs, keep_values=keep_values)


def check_io_fits(tflite, model, variables, batch) -> None:
  """Raises unless ``model`` (``variables``: a Linen model's), run on the
  ``.tflite``'s input shapes with ``batch``'s dtypes, gives outputs of the
  ``.tflite``'s output shapes. A cheap check (one abstract trace, no
  calibration) that ``qlite compare`` runs before calibrating;
  :func:`compare` checks this and more (:func:`check_tflite_fits`).

  Raises:
    QliteError: the message names the ``.tflite`` and what differs.
    TFLiteFormatError: ``tflite`` is not a readable .tflite model.
  """
  from qlite.trace import flax_hooks
  blob, name = _read_blob(tflite)
  info = inspect_lib.inspect_tflite(blob)
  mf = flax_hooks.model_function(model, variables)
  problem = describe_bad_batch(batch, what="compare: batch 0")
  if problem is not None:
    raise QliteError(problem)
  flat = jax.tree.leaves(_as_args(batch))
  in_shapes = [tuple(int(d) for d in info.tensors[t].shape)
               for t in info.inputs]
  lite_out = [tuple(int(d) for d in info.tensors[t].shape)
              for t in info.outputs]
  head = f"compare: {name} does not fit {mf.description}"
  tail = (". Was it exported from another model (or another version of "
          "it)? Pass the .tflite exported from this model.")
  if len(flat) != len(in_shapes):
    raise QliteError(f"{head}: it takes {len(in_shapes)} input(s) "
                     f"{in_shapes}, the batches give {len(flat)} array(s)"
                     f"{tail}")
  dtypes = [np.asarray(x).dtype for x in flat]

  def out_shapes(shapes):
    avals = [jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dtypes)]
    return jax.eval_shape(mf.fn, mf.params, *avals)
  try:
    outs = out_shapes(in_shapes)
  except QliteError:
    raise
  except Exception as e:
    try:                # refuse only if the model runs on its own batch
      out_shapes([tuple(np.shape(x)) for x in flat])
    except Exception:
      return            # an abstract trace cannot tell: compare will
    first = str(e).splitlines()[0] if str(e) else ""
    raise QliteError(f"{head}: the model fails on the .tflite's input "
                     f"shapes {in_shapes} ({type(e).__name__}: {first})"
                     f"{tail}") from None
  shapes = [tuple(int(d) for d in np.shape(o)) for o in jax.tree.leaves(outs)]
  if shapes != lite_out:
    raise QliteError(f"{head}: its outputs {lite_out} are not the model's "
                     f"{shapes} (on the .tflite's input shapes {in_shapes})"
                     f"{tail}")


# Refuse a .tflite of another model: compare would pair its tensors with
# the model's boundaries by name and shape and report figures of nothing.
MIN_MATCHED_FRACTION = 0.5


def _shape(graph, var) -> tuple[int, ...]:
  if isinstance(var, graph_lib.Lit):
    return tuple(np.shape(var.value))
  return tuple(int(d) for d in graph.avals[var].shape)


def check_tflite_fits(info, graph, plan, matched, tflite_name: str,
                      model_name: str = "the model", scales=None) -> None:
  """Raises when the ``.tflite`` (``info``) was not exported from the model
  traced as ``graph`` / ``plan``; warns when it fits but carries other
  scales.

  Refused: other model outputs (count or shapes); fewer than half of the
  plan's activation boundaries (model inputs aside) find a LiteRT tensor
  (``matched``, from :func:`qlite.analysis.matching.match_tensors`); fewer
  than half of the quantized weights find a constant of their size.
  Warned (when ``scales``, ``{boundary var: (scale, zero point)}``, are
  given): no matched boundary (model inputs aside) has the scale the stats
  give (exported with other stats, or from other weights).

  Raises:
    QliteError: names ``tflite_name`` and every difference found.
  """
  problems = []
  out_shapes = [_shape(graph, v) for v in graph.out_vars]
  lite_out = [tuple(int(d) for d in info.tensors[t].shape)
              for t in info.outputs]
  if len(lite_out) != len(out_shapes):
    problems.append(f"it has {len(lite_out)} output(s) {lite_out}, the "
                    f"model {len(out_shapes)} {out_shapes}")
  else:
    diff = [f"output {i}: .tflite {a} vs model {b}"
            for i, (a, b) in enumerate(zip(lite_out, out_shapes)) if a != b]
    if diff:
      problems.append("its output shapes differ (" + "; ".join(diff) + ")")
  inputs = set(graph.arg_vars)
  acts = [v for v in plan.boundaries if v not in inputs]
  found = [v for v in acts if matched[v][0] is not None]
  if acts and len(found) < MIN_MATCHED_FRACTION * len(acts):
    missing = [plan.boundaries[v].key for v in acts
               if matched[v][0] is None]
    shown = ", ".join(f"`{k}`" for k in missing[:5])
    more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
    problems.append(f"only {len(found)} of the model's {len(acts)} "
                    f"quantized activations have a tensor of their shape in "
                    f"it (none for {shown}{more})")
  if plan.weights:
    sizes = collections.Counter(
        int(np.prod(t.shape, dtype=np.int64)) for t in info.tensors
        if t.is_constant)
    wanted = []
    for (node, operand) in plan.weights:
      var = graph.nodes[node].inputs[operand]
      wanted.append(int(np.prod(_shape(graph, var), dtype=np.int64)))
    hits = sum(1 for n in wanted if sizes.get(n, 0) > 0)
    if hits < MIN_MATCHED_FRACTION * len(wanted):
      problems.append(f"only {hits} of the model's {len(wanted)} quantized "
                      f"weights have a constant of their size in it")
  if problems:
    raise QliteError(
        f"compare: {tflite_name} does not fit {model_name}: "
        + "; ".join(problems) + ". Was it exported from another model (or "
        "another version of it)? Pass the .tflite exported from this model "
        "with these rules.")
  if scales is None or not found:
    return
  other = [v for v in found if not matching.same_scale(
      matched[v][0], float(scales[v][0][0]), int(scales[v][1][0]))]
  if len(other) == len(found):
    warnings.warn(
        f"qlite compare: {tflite_name} fits {model_name}, but none of its "
        f"{len(found)} matched activations has the scale the stats give "
        f"(e.g. `{plan.boundaries[other[0]].key}`): it was exported with "
        f"other stats or from other weights; the fake-quant figures describe "
        f"another quantization than the .tflite's", UserWarning,
        stacklevel=3)

def _run_chunk(run: _Run, chunk, runner):
  n_out = len(run.graph.out_vars)
  f_all = [np.asarray(x) for x in run.float_fn(run.flat_params, chunk)]
  q_all = [np.asarray(x) for x in run.fq_fn(*chunk)]
  lite_out = runner.run(*chunk)
  for i in range(n_out):
    run.out_vals["float"][i].append(f_all[i])
    run.out_vals["fakequant"][i].append(q_all[i])
    run.out_vals["litert"][i].append(np.asarray(lite_out[i]))
  for j, var in enumerate(run.boundaries):
    b = run.plan.boundaries[var]
    s, z = run.scales[var]
    vals = {"float": f_all[n_out + j], "fakequant": q_all[n_out + j]}
    vals["own"] = np.asarray(numerics.fake_quant(
        vals["float"].astype(np.float32), s[0], z[0], b.rule.act_qtype))
    t, _ = run.matched[var]
    if t is not None:
      vals["litert"] = _dequantize(runner.tensor(t.index), t).reshape(
          vals["float"].shape)
      d = float(np.max(np.abs(vals["litert"] - vals["fakequant"]))) / float(
          s[0]) if vals["float"].size else 0.0
      run.lsb[var] = max(run.lsb.get(var, 0.0), d)
    for name, (ref, test) in LAYER_METRICS.items():
      if ref in vals and test in vals:
        run.accs[var][name].add(vals[ref], vals[test])
    if run.keep_values:
      for side, v in vals.items():
        run.kept.setdefault(var, {}).setdefault(side, []).append(
            np.asarray(v))


def _build_report(run: _Run, model_name: str, tflite_name: str,
                  num_samples: int, num_batches: int) -> Report:
  outputs = []
  for o in run.outputs:
    cat = {side: np.concatenate(run.out_vals[side][o.index])
           for side in _SIDES}
    metrics = {name: _pair_metrics(cat[ref], cat[test])
               for name, (ref, test) in PAIRS.items()}
    max_lsb = None
    if o.scale:
      max_lsb = float(np.max(np.abs(cat["litert"].astype(np.float64) -
                                    cat["fakequant"]))) / o.scale
    outputs.append(OutputRow(o.index, o.shape, o.scale, metrics, max_lsb))
  layers = []
  values = {} if run.keep_values else None
  for var in run.boundaries:
    b = run.plan.boundaries[var]
    s, z = run.scales[var]
    t, how = run.matched[var]
    metrics = {name: acc.result() for name, acc in run.accs[var].items()
               if acc.n > 0 or "litert" not in name}
    layers.append(LayerRow(
        b.key, b.module_path, b.op,
        tuple(int(d) for d in run.graph.avals[var].shape), float(s[0]),
        int(z[0]), None if t is None else t.index,
        None if t is None else t.name, how, metrics, run.lsb.get(var),
        run.explorer_keys.get(var)))
    if values is not None:
      values[b.key] = {side: np.concatenate([np.reshape(x, (1,) + x.shape)
                                             if x.ndim == 0 else x
                                             for x in chunks])
                       for side, chunks in run.kept.get(var, {}).items()}
  return Report(model_name, tflite_name, num_samples, num_batches, outputs,
                layers, values)


# --------------------------------------------------------------------------
# Inputs.

def _dequantize(q: np.ndarray, t) -> np.ndarray:
  q = np.asarray(q)
  if t.scale is None or not np.issubdtype(q.dtype, np.integer):
    return q.astype(np.float64)
  # float32, as the fake-quant decomposition computes it: equal codes give
  # bit-identical values.
  return (q.astype(np.float32) - np.float32(t.zero_point[0])) * \
      np.float32(t.scale[0])


def _as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _read_blob(tflite) -> tuple[bytes, str]:
  if isinstance(tflite, (bytes, bytearray, memoryview)):
    return bytes(tflite), "<bytes>"
  if isinstance(tflite, (str, os.PathLike)):
    path = os.fspath(tflite)
    if not os.path.isfile(path):
      raise TFLiteFormatError(f"compare: no such .tflite file {path!r}")
    with open(path, "rb") as f:
      return f.read(), path
  raise TFLiteFormatError(f"compare: tflite must be a path or bytes, got "
                          f"{type(tflite).__name__}")


def _chunks(flat: list, shapes: list[tuple], batch_no: int,
            tflite_name: str = "the .tflite") -> list[list]:
  """Splits a batch's flat args into row chunks of the .tflite input shapes."""
  if len(flat) != len(shapes):
    raise QliteError(f"compare: batch {batch_no} has {len(flat)} arrays, the "
                     f".tflite model takes {len(shapes)} inputs (if the "
                     f"batches fit the model, {tflite_name} was exported "
                     f"from another model)")
  got = [tuple(np.shape(x)) for x in flat]
  if got == [tuple(s) for s in shapes]:
    return [list(flat)]
  n = None
  for i, (g, s) in enumerate(zip(got, shapes)):
    ok = len(g) == len(s) and len(s) >= 1 and g[1:] == tuple(s[1:]) and \
        s[0] > 0 and g[0] % s[0] == 0
    k = g[0] // s[0] if ok else None
    if not ok or (n is not None and k != n):
      raise QliteError(
          f"compare: batch {batch_no}, input {i} has shape {g}; the .tflite "
          f"takes {tuple(s)} (fixed at export): pass batches whose rows are "
          f"a multiple of {s[0] if s else 1} with the same trailing shape "
          f"(if the batches fit the model, {tflite_name} was exported from "
          f"another model)")
    n = k
  return [[np.asarray(x)[j * s[0]:(j + 1) * s[0]] for x, s in zip(flat, shapes)]
          for j in range(n)]
