"""Compare float JAX, qlite's fake-quant JAX and the LiteRT interpreter on the
same inputs: end to end, and layer by layer keyed by Flax module path.

The fake-quant model is the same function qlite exports (``ConversionProvider``
with the same rules and stats), so LiteRT and fake-quant should agree within an
LSB or two at every boundary; where they do not, the converter or the runtime
computed something else. Float vs fake-quant shows what quantization costs.

Per layer, every activation boundary of the plan is matched to the LiteRT
tensor that carries it: same shape, same quantization scale / zero point (a
precise fingerprint) and, where the converter kept it, the same JAX name stack
(``jit(f)/Conv_0/conv_general_dilated``, or fused ``a;b;c`` names).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import math
import os
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from qlite.trace import graph as graph_lib
from qlite.litert.providers import ConversionProvider
from qlite.quant.scales import as_quant_stats, boundary_scale
from qlite.litert import inspect as inspect_lib
from qlite.litert.runtime import TFLiteRunner
from qlite.core import numerics
from qlite.errors import QliteError, TFLiteFormatError
from qlite.metrics import cosine, sqnr_db
from qlite.quant.provider import quantize_model
from qlite.litert.inspect import tensor_module_path

__all__ = ["compare", "Report", "LayerRow", "OutputRow", "PairMetrics",
           "PAIRS", "LAYER_METRICS", "REPORT_FORMAT"]

REPORT_FORMAT = "qlite.CompareReport"
REPORT_VERSION = 1

# name -> (reference side, tested side). Metrics are of `tested` against
# `reference`: SQNR = 10 log10(sum ref^2 / sum (ref - test)^2).
PAIRS = {
    "fakequant_vs_float": ("float", "fakequant"),
    "litert_vs_float": ("float", "litert"),
    "litert_vs_fakequant": ("fakequant", "litert"),
}
# Per layer also: the float activation quantized with this boundary's own
# scale only (no upstream error): the noise this one boundary adds.
LAYER_METRICS = dict(PAIRS, own_vs_float=("float", "own"))

_SHORT = {"fakequant_vs_float": "fq~float", "litert_vs_float": "lite~float",
          "litert_vs_fakequant": "lite~fq", "own_vs_float": "own"}
_INT_DTYPES = {"INT8", "UINT8", "INT16", "INT32", "INT4"}


# --------------------------------------------------------------------------
# Metrics.

@dataclasses.dataclass
class PairMetrics:
  """Error of one side against a reference (see :data:`PAIRS`)."""
  max_abs: float
  mean_abs: float
  sqnr_db: float
  cosine: float
  top1_agreement: float | None = None   # outputs with last dim > 1 only

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "PairMetrics":
    return cls(**{k: _num(v) for k, v in d.items()})


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
    if self.err_sq == 0.0:
      sqnr = math.inf
    elif self.ref_sq == 0.0:
      sqnr = -math.inf
    else:
      sqnr = 10.0 * math.log10(self.ref_sq / self.err_sq)
    na, nb = math.sqrt(self.ref_sq), math.sqrt(self.test_sq)
    cos = float(na == nb) if na == 0 or nb == 0 else self.dot / (na * nb)
    return PairMetrics(self.max_abs, self.sum_abs / max(self.n, 1), sqnr, cos)


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
# The report.

@dataclasses.dataclass
class OutputRow:
  """End-to-end metrics of one model output."""
  index: int
  shape: tuple[int, ...]          # of one LiteRT run (the export batch)
  scale: float | None             # the int8 output's scale (None: float out)
  metrics: dict[str, PairMetrics]
  max_lsb: float | None           # max |LiteRT - fake-quant| / scale

  def to_dict(self) -> dict:
    return {"index": self.index, "shape": list(self.shape),
            "scale": self.scale, "max_lsb": self.max_lsb,
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()}}

  @classmethod
  def from_dict(cls, d: dict) -> "OutputRow":
    return cls(d["index"], tuple(d["shape"]), _num(d["scale"]),
               {k: PairMetrics.from_dict(m) for k, m in d["metrics"].items()},
               _num(d["max_lsb"]))


@dataclasses.dataclass
class LayerRow:
  """One activation boundary: where it is in the model and the LiteRT
  tensor that carries it (``tensor_index`` None when unmatched)."""
  key: str                        # stats key, e.g. "Conv_0/conv_general_dilated"
  module_path: str                # "" for model inputs
  op: str
  shape: tuple[int, ...]
  scale: float
  zero_point: int
  tensor_index: int | None
  tensor_name: str | None
  match: str                      # how it was matched, or why not
  metrics: dict[str, PairMetrics]  # keys of LAYER_METRICS (LiteRT ones absent
                                   # when unmatched)
  max_lsb: float | None           # max |LiteRT - fake-quant| / scale
  explorer_key: str | None = None  # Model Explorer node key: the tensor name
                                   # when unique, else the producing op index

  @property
  def layer(self) -> str:
    """The module path, or the boundary key for model inputs."""
    return self.module_path or self.key

  @property
  def matched(self) -> bool:
    return self.tensor_index is not None

  def sqnr(self, metric: str) -> float | None:
    """Returns the layer's SQNR (dB) for ``metric``, None if not measured."""
    m = self.metrics.get(metric)
    return None if m is None else m.sqnr_db

  def to_dict(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["shape"] = list(self.shape)
    d["layer"] = self.layer
    d["metrics"] = {k: m.to_dict() for k, m in self.metrics.items()}
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "LayerRow":
    kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
    kw["shape"] = tuple(kw["shape"])
    kw["scale"] = _num(kw["scale"])
    kw["max_lsb"] = _num(kw["max_lsb"])
    kw["metrics"] = {k: PairMetrics.from_dict(m)
                     for k, m in d["metrics"].items()}
    return cls(**kw)


@dataclasses.dataclass
class Report:
  """What :func:`compare` returns. ``print(report)`` renders the tables."""
  model: str
  tflite: str                     # path, or "<bytes>"
  num_samples: int                # LiteRT runs (rows of the export batch)
  num_batches: int
  outputs: list[OutputRow]
  layers: list[LayerRow]          # every boundary, in graph order
  values: dict[str, dict[str, np.ndarray]] | None = dataclasses.field(
      default=None, repr=False, compare=False)   # keep_values=True only

  @property
  def unmatched(self) -> list[LayerRow]:
    """Boundaries with no LiteRT tensor found (their JAX metrics remain)."""
    return [r for r in self.layers if not r.matched]

  def layer(self, name: str) -> LayerRow:
    """Returns the row whose module path (or key) is ``name``.

    Raises:
      QliteError: no such layer (lists the known ones).
    """
    for r in self.layers:
      if name in (r.key, r.module_path, r.layer):
        return r
    raise QliteError(f"no layer {name!r} in the report; layers: "
                     f"{', '.join(r.layer for r in self.layers)}")

  def worst(self, n: int = 3, metric: str = "litert_vs_float"
            ) -> list[LayerRow]:
    """Returns the ``n`` rows with the lowest SQNR for ``metric`` (rows
    without it are skipped), worst first.

    Raises:
      QliteError: unknown metric.
    """
    _check_metric(metric)
    rows = [r for r in self.layers if r.sqnr(metric) is not None]
    return sorted(rows, key=lambda r: r.sqnr(metric))[:n]

  # ---- rendering ---------------------------------------------------------

  def table(self, worst: int | None = None,
            metric: str = "litert_vs_float") -> str:
    """Returns the aligned text tables; the ``worst`` rows by ``metric``
    SQNR are marked ``<-- worst`` (default: ~1 in 5 rows, at most 3)."""
    if worst is None:
      worst = min(3, max(1, math.ceil(len(self.layers) / 5)))
    marked = {id(r) for r in self.worst(worst, metric)
              if r.sqnr(metric) != math.inf}
    lines = [f"qlite compare: {self.model} vs {self.tflite}: "
             f"{self.num_samples} LiteRT runs over {self.num_batches} "
             f"batch(es)"]
    for o in self.outputs:
      scale = "float" if o.scale is None else f"scale {o.scale:.6g}"
      lines.append(f"\nend to end, output {o.index} {tuple(o.shape)} "
                   f"({scale}):")
      head = ["pair", "max|err|", "mean|err|", "SQNR dB", "cosine", "top-1"]
      body = []
      for name, m in o.metrics.items():
        body.append([name.replace("_vs_", " vs "), _f(m.max_abs),
                     _f(m.mean_abs), _db(m.sqnr_db), f"{m.cosine:.6f}",
                     "-" if m.top1_agreement is None
                     else f"{100 * m.top1_agreement:.2f} %"])
      lines += _align(head, body, right=range(1, 6))
      if o.max_lsb is not None:
        lines.append(f"  max |LiteRT - fake-quant| = {o.max_lsb:.2f} LSB "
                     f"of the output scale")
    lines.append(f"\nper layer ({len(self.layers)} boundaries, graph order; "
                 f"SQNR in dB of the first side against the second; own = "
                 f"float quantized with this boundary's scale only; "
                 f"LSB = max |LiteRT - fake-quant| / scale):")
    head = ["#", "layer", "op", "shape", "scale", "fq~float", "lite~float",
            "lite~fq", "own", "LSB", "LiteRT tensor", ""]
    body = []
    for i, r in enumerate(self.layers):
      body.append([str(i), r.layer, r.op, str(tuple(r.shape)),
                   f"{r.scale:.4g}"] +
                  [_db(r.sqnr(k)) for k in ("fakequant_vs_float",
                                            "litert_vs_float",
                                            "litert_vs_fakequant",
                                            "own_vs_float")] +
                  ["-" if r.max_lsb is None else f"{r.max_lsb:.2f}",
                   f"#{r.tensor_index}" if r.matched else "UNMATCHED",
                   "<-- worst" if id(r) in marked else ""])
    lines += _align(head, body, right=(0, 4, 5, 6, 7, 8, 9))
    if self.unmatched:
      lines.append(f"\nunmatched ({len(self.unmatched)}): no LiteRT tensor "
                   f"with the boundary's shape and scale:")
      for r in self.unmatched:
        lines.append(f"  {r.key} ({r.op}, shape {tuple(r.shape)}, scale "
                     f"{r.scale:.6g}): {r.match}")
    else:
      lines.append("unmatched: none")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()

  # ---- serialisation -----------------------------------------------------

  def to_dict(self) -> dict:
    """Returns the report as a JSON-ready dict (``inf`` / ``nan`` as the
    strings ``"inf"``, ``"-inf"``, ``"nan"``)."""
    d = {"format": REPORT_FORMAT, "version": REPORT_VERSION,
         "model": self.model, "tflite": self.tflite,
         "num_samples": self.num_samples, "num_batches": self.num_batches,
         "outputs": [o.to_dict() for o in self.outputs],
         "layers": [r.to_dict() for r in self.layers],
         "unmatched": [r.key for r in self.unmatched]}
    return _finite_json(d)

  def to_json(self, path=None, *, indent: int | None = 1) -> str:
    """Returns the report as JSON text (standard JSON: non-finite numbers as
    strings); also writes it to ``path`` when given.

    Raises:
      QliteError: ``path`` cannot be written.
    """
    text = json.dumps(self.to_dict(), indent=indent)
    if path is not None:
      _write(path, text)
    return text

  @classmethod
  def from_json(cls, text_or_path) -> "Report":
    """Returns the :class:`Report` in a JSON text or file from :meth:`to_json`.

    Raises:
      QliteError: unreadable file, not JSON, or not a qlite compare report.
    """
    text = text_or_path
    if isinstance(text_or_path, os.PathLike) or (
        isinstance(text_or_path, str) and not text_or_path.lstrip()
        .startswith("{")):
      try:
        with open(text_or_path) as f:
          text = f.read()
      except OSError as e:
        raise QliteError(f"cannot read compare report {text_or_path!r}: "
                         f"{e}") from None
    try:
      d = json.loads(text)
    except json.JSONDecodeError as e:
      raise QliteError(f"compare report is not valid JSON: {e}") from None
    if not isinstance(d, dict) or d.get("format") != REPORT_FORMAT:
      raise QliteError(f"not a qlite compare report (format "
                       f"{d.get('format') if isinstance(d, dict) else None!r})")
    return cls(d["model"], d["tflite"], d["num_samples"], d["num_batches"],
               [OutputRow.from_dict(o) for o in d["outputs"]],
               [LayerRow.from_dict(r) for r in d["layers"]])

  def csv_rows(self) -> list[dict]:
    """Returns one flat dict per layer (the CSV's rows)."""
    rows = []
    for i, r in enumerate(self.layers):
      row = {"index": i, "layer": r.layer, "key": r.key,
             "module_path": r.module_path, "op": r.op,
             "shape": "x".join(str(s) for s in r.shape), "scale": r.scale,
             "zero_point": r.zero_point,
             "tensor_index": "" if r.tensor_index is None else r.tensor_index,
             "tensor_name": r.tensor_name or "", "match": r.match,
             "max_lsb": "" if r.max_lsb is None else r.max_lsb}
      for k in LAYER_METRICS:
        m = r.metrics.get(k)
        for f in ("sqnr_db", "max_abs", "mean_abs", "cosine"):
          row[f"{k}.{f}"] = "" if m is None else getattr(m, f)
      rows.append(row)
    return rows

  def to_csv(self, path=None) -> str:
    """Returns the per-layer table as CSV text (one row per boundary, metric
    columns named ``<pair>.<metric>``); also writes ``path`` when given.

    Raises:
      QliteError: ``path`` cannot be written.
    """
    rows = self.csv_rows()
    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["index", "layer"]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    text = buf.getvalue()
    if path is not None:
      _write(path, text)
    return text

  def model_explorer_data(self, metric: str = "litert_vs_float",
                          name: str | None = None) -> dict:
    """Returns Model Explorer node data (a ``GraphNodeData`` dict of
    ``ai-edge-model-explorer``: ``{"name", "results": {key: {"value"}},
    "thresholds"}``) with each matched layer's SQNR (dB) for ``metric``.

    Keys are the LiteRT output tensor names (Model Explorer matches them to
    the node producing that tensor), or the producing op's index (its node
    id) where a name is not unique. Infinite SQNR is written as 200 dB.
    Thresholds colour < 20 dB red, < 30 orange, < 40 yellow, else green.

    Raises:
      QliteError: unknown metric.
    """
    _check_metric(metric)
    results = {}
    for r in self.layers:
      v = r.sqnr(metric)
      if not r.matched or v is None:
        continue
      v = 200.0 if v == math.inf else (-200.0 if v == -math.inf else v)
      if math.isnan(v):
        continue
      results[r.explorer_key or r.tensor_name] = {"value": round(float(v), 3)}
    return {"name": name or f"qlite SQNR dB ({metric})",
            "results": results,
            "thresholds": [{"value": 20, "bgColor": "#ef5350"},
                           {"value": 30, "bgColor": "#ffa726"},
                           {"value": 40, "bgColor": "#ffee58"},
                           {"value": 1e9, "bgColor": "#66bb6a"}]}

  def to_model_explorer(self, path, metric: str = "litert_vs_float",
                        name: str | None = None) -> dict:
    """Writes :meth:`model_explorer_data` as JSON to ``path`` (load it in
    Model Explorer next to the ``.tflite``: ``model-explorer model.tflite
    --node_data_paths=path``); returns the dict.

    Raises:
      QliteError: unknown metric, or ``path`` cannot be written.
    """
    data = self.model_explorer_data(metric, name)
    _write(path, json.dumps(data, indent=1))
    return data


def _check_metric(metric: str):
  if metric not in LAYER_METRICS:
    raise QliteError(f"unknown metric {metric!r}; choose one of "
                     f"{', '.join(LAYER_METRICS)}")


def _num(v):
  if isinstance(v, str):
    return float(v)
  return v


def _finite_json(x):
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)          # "inf", "-inf", "nan": float() reads them back
  if isinstance(x, dict):
    return {k: _finite_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite_json(v) for v in x]
  if isinstance(x, np.generic):
    return _finite_json(x.item())
  return x


def _write(path, text: str):
  try:
    with open(path, "w") as f:
      f.write(text)
  except OSError as e:
    raise QliteError(f"cannot write {os.fspath(path)!r}: {e}") from None


def _f(x: float) -> str:
  return f"{x:.4g}"


def _db(x: float | None) -> str:
  if x is None:
    return "-"
  if x == math.inf:
    return "inf"
  return f"{x:.1f}"


def _align(head: list[str], body: list[list[str]], right=()) -> list[str]:
  right = set(right)
  widths = [max(len(row[i]) for row in [head] + body)
            for i in range(len(head))]

  def fmt(row):
    cells = [c.rjust(w) if i in right else c.ljust(w)
             for i, (c, w) in enumerate(zip(row, widths))]
    return ("  " + "  ".join(cells)).rstrip()
  return [fmt(head)] + [fmt(r) for r in body]


# --------------------------------------------------------------------------
# Matching boundaries to LiteRT tensors.

def _name_pairs(tensor_name: str) -> set[tuple[str, str]]:
  """``(module_path, op)`` of every ``;``-separated part of a tensor name."""
  return {tensor_module_path(part) for part in tensor_name.split(";")}


def _same_scale(t, scale: float, zp: int) -> bool:
  return (t.scale is not None and t.scale.size == 1 and
          abs(float(t.scale[0]) - scale) <= 1e-6 * abs(scale) and
          int(t.zero_point[0]) == zp)


def _match_tensors(info, graph, plan, scales) -> dict[int, tuple[Any, str]]:
  """Returns ``{boundary var: (TensorInfo | None, how)}``."""
  producer = {}
  for op in info.ops:
    for o in op.outputs:
      producer[o] = op
  model_inputs = list(info.inputs)

  def input_position(t) -> int | None:
    """The model input a tensor carries (itself, or a QUANTIZE of it)."""
    if t.index in model_inputs:
      return model_inputs.index(t.index)
    op = producer.get(t.index)
    if op is not None and op.name == "QUANTIZE" and op.inputs and \
        op.inputs[0] in model_inputs:
      return model_inputs.index(op.inputs[0])
    return None

  acts = [t for t in info.tensors if not t.is_constant and
          t.dtype in _INT_DTYPES and t.scale is not None and t.scale.size == 1]
  arg_pos = {v: i for i, v in enumerate(graph.arg_vars)}
  taken: dict[int, str] = {}       # tensor index -> first boundary key
  out = {}
  for var, b in plan.boundaries.items():
    shape = tuple(int(d) for d in graph.avals[var].shape)
    s, z = scales[var]
    scale, zp = float(s[0]), int(z[0])

    def name_score(t):
      if var in arg_pos:
        return 2 if input_position(t) == arg_pos[var] else 0
      pairs = _name_pairs(t.name)
      if (b.module_path, b.op) in pairs:
        return 2
      if b.module_path and any(p == b.module_path for p, _ in pairs):
        return 1
      return 0

    best, best_key = None, None
    for t in acts:
      if tuple(t.shape) != shape:
        continue
      same, score = _same_scale(t, scale, zp), name_score(t)
      if not same and score == 0:
        continue
      op = producer.get(t.index)
      key = (same, score, t.index not in taken,
             -(op.index if op is not None else -1))
      if best_key is None or key > best_key:
        best, best_key = t, key
    if best is None:
      out[var] = (None, f"no LiteRT tensor of shape {shape} with scale "
                        f"{scale:.6g} / zero point {zp} or named after "
                        f"`{b.module_path or b.key}/{b.op}` (the converter "
                        f"fused or folded it away, or the .tflite was "
                        f"exported with other stats)")
      continue
    same, score = best_key[0], best_key[1]
    how = "+".join(w for w, ok in (("name", score == 2),
                                   ("module", score == 1),
                                   ("shape", True), ("scale", same)) if ok)
    if not same:
      how += (f" (SCALE DIFFERS: .tflite {float(best.scale[0]):.6g} vs "
              f"stats {scale:.6g}: exported with other stats?)")
    if best.index in taken:
      how += f" (shares the tensor of `{taken[best.index]}`: fused)"
    taken.setdefault(best.index, b.key)
    out[var] = (best, how)
  return out


# --------------------------------------------------------------------------
# compare().

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


def _chunks(flat: list, shapes: list[tuple], batch_no: int) -> list[list]:
  """Splits a batch's flat args into row chunks of the .tflite input shapes."""
  if len(flat) != len(shapes):
    raise QliteError(f"compare: batch {batch_no} has {len(flat)} arrays, the "
                     f".tflite model takes {len(shapes)} inputs")
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
          f"a multiple of {s[0] if s else 1} with the same trailing shape")
    n = k
  return [[np.asarray(x)[j * s[0]:(j + 1) * s[0]] for x, s in zip(flat, shapes)]
          for j in range(n)]


def compare(model, rules, stats, tflite, batches: Iterable[Any],
            variables=None, *, progress: bool = True,
            keep_values: bool = False,
            num_threads: int | None = None) -> Report:
  """Runs the float JAX model, qlite's fake-quant JAX model (same rules and
  stats as the export) and the LiteRT interpreter on ``batches``; returns a
  :class:`Report` with end-to-end metrics per output and per-layer metrics
  for every activation boundary, keyed by Flax module path in graph order.

  ``tflite``: a path or the bytes from :func:`qlite.export_tflite`. Its
  inputs are batch-fixed; a batch with more rows is run in row chunks of the
  export batch. ``batches``: an iterable of arrays or tuples of positional
  arrays. ``keep_values``: store every layer's float / fake-quant / LiteRT
  values in ``report.values[key]`` (memory grows with the data).

  Raises:
    QliteError: no batches, batch shapes the .tflite cannot take, a Linen
      model without ``variables``.
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
  state = None
  out_vals: dict[str, list[list[np.ndarray]]] = {}
  accs: dict[int, dict[str, _Accumulator]] = {}
  lsb: dict[int, float] = {}
  kept: dict[int, dict[str, list]] = {}
  num_samples = num_batches = 0
  for num_batches, batch in enumerate(batches, start=1):
    flat = jax.tree.leaves(_as_args(batch))
    for chunk in _chunks(flat, in_shapes, num_batches - 1):
      if state is None:
        state = _prepare(qm, provider, chunk, flat_params, info, stats)
        out_vals = {side: [[] for _ in state["outs"]]
                    for side in ("float", "fakequant", "litert")}
        accs = {v: {k: _Accumulator() for k in LAYER_METRICS}
                for v in state["boundaries"]}
      _run_chunk(state, chunk, runner, out_vals, accs, lsb,
                 kept if keep_values else None)
      num_samples += 1
    bar.update(1)
  bar.close()
  if state is None:
    raise QliteError("compare: `batches` is empty; pass at least one batch "
                     "of inputs")
  return _build_report(state, qm, tflite_name, num_samples, num_batches,
                       out_vals, accs, lsb, kept if keep_values else None)


def _prepare(qm, provider, chunk, flat_params, info, stats) -> dict:
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
  matched = _match_tensors(info, graph, plan, scales)
  n_out = len(graph.out_vars)
  outs = []
  for i, t_index in enumerate(info.outputs[:n_out]):
    t = info.tensors[t_index]
    scale = None
    if t.scale is not None and t.scale.size == 1:
      scale = float(t.scale[0])
    else:
      for op in info.ops:
        if t_index in op.outputs and op.name == "DEQUANTIZE":
          src = info.tensors[op.inputs[0]]
          if src.scale is not None and src.scale.size == 1:
            scale = float(src.scale[0])
    outs.append({"index": i, "shape": tuple(t.shape), "scale": scale})
  names = collections.Counter(t.name for t in info.tensors)
  producer = {o: op.index for op in info.ops for o in op.outputs}
  explorer_keys = {}
  for var, (t, _) in matched.items():
    if t is not None:
      explorer_keys[var] = t.name if names[t.name] == 1 or \
          t.index not in producer else str(producer[t.index])
  return {"graph": graph, "plan": plan, "boundaries": bvars,
          "explorer_keys": explorer_keys,
          "fq_fn": fq_fn, "float_fn": float_fn, "flat_params": flat_params,
          "scales": scales, "matched": matched, "n_out": n_out,
          "outs": outs}


def _dequantize(q: np.ndarray, t) -> np.ndarray:
  q = np.asarray(q)
  if t.scale is None or not np.issubdtype(q.dtype, np.integer):
    return q.astype(np.float64)
  # float32, as the fake-quant decomposition computes it: equal codes give
  # bit-identical values.
  return (q.astype(np.float32) - np.float32(t.zero_point[0])) * \
      np.float32(t.scale[0])


def _run_chunk(state, chunk, runner, out_vals, accs, lsb, kept):
  n_out = state["n_out"]
  f_all = [np.asarray(x) for x in state["float_fn"](state["flat_params"],
                                                    chunk)]
  q_all = [np.asarray(x) for x in state["fq_fn"](*chunk)]
  lite_out = runner.run(*chunk)
  for i in range(n_out):
    out_vals["float"][i].append(f_all[i])
    out_vals["fakequant"][i].append(q_all[i])
    out_vals["litert"][i].append(np.asarray(lite_out[i]))
  plan = state["plan"]
  for j, var in enumerate(state["boundaries"]):
    b = plan.boundaries[var]
    s, z = state["scales"][var]
    vals = {"float": f_all[n_out + j], "fakequant": q_all[n_out + j]}
    vals["own"] = np.asarray(numerics.fake_quant(
        vals["float"].astype(np.float32), s[0], z[0], b.rule.act_qtype))
    t, _ = state["matched"][var]
    if t is not None:
      vals["litert"] = _dequantize(runner.tensor(t.index), t).reshape(
          vals["float"].shape)
      d = float(np.max(np.abs(vals["litert"] - vals["fakequant"]))) / float(
          s[0]) if vals["float"].size else 0.0
      lsb[var] = max(lsb.get(var, 0.0), d)
    for name, (ref, test) in LAYER_METRICS.items():
      if ref in vals and test in vals:
        accs[var][name].add(vals[ref], vals[test])
    if kept is not None:
      for side, v in vals.items():
        kept.setdefault(var, {}).setdefault(side, []).append(np.asarray(v))


def _build_report(state, qm, tflite_name, num_samples, num_batches, out_vals,
                  accs, lsb, kept) -> Report:
  outputs = []
  for o in state["outs"]:
    i = o["index"]
    cat = {side: np.concatenate(out_vals[side][i])
           for side in ("float", "fakequant", "litert")}
    metrics = {name: _pair_metrics(cat[ref], cat[test])
               for name, (ref, test) in PAIRS.items()}
    max_lsb = None
    if o["scale"]:
      max_lsb = float(np.max(np.abs(cat["litert"].astype(np.float64) -
                                    cat["fakequant"]))) / o["scale"]
    outputs.append(OutputRow(i, o["shape"], o["scale"], metrics, max_lsb))
  layers = []
  graph, plan = state["graph"], state["plan"]
  values = {} if kept is not None else None
  for var in state["boundaries"]:
    b = plan.boundaries[var]
    s, z = state["scales"][var]
    t, how = state["matched"][var]
    metrics = {name: acc.result() for name, acc in accs[var].items()
               if acc.n > 0 or "litert" not in name}
    layers.append(LayerRow(
        b.key, b.module_path, b.op,
        tuple(int(d) for d in graph.avals[var].shape), float(s[0]),
        int(z[0]), None if t is None else t.index,
        None if t is None else t.name, how, metrics, lsb.get(var),
        state["explorer_keys"].get(var)))
    if values is not None:
      values[b.key] = {side: np.concatenate([np.reshape(x, (1,) + x.shape)
                                             if x.ndim == 0 else x
                                             for x in chunks])
                       for side, chunks in kept.get(var, {}).items()}
  return Report(qm.mf.description, tflite_name, num_samples, num_batches,
                outputs, layers, values)
