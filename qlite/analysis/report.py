"""The compare report: metrics per model output and per activation boundary,
rendered as text tables, JSON, CSV, Model Explorer node data or a
self-contained HTML page (:mod:`qlite.analysis.html`)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os

import numpy as np

from qlite.errors import QliteError

__all__ = ["Report", "LayerRow", "OutputRow", "PairMetrics", "PAIRS",
           "LAYER_METRICS", "REPORT_FORMAT"]

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


@dataclasses.dataclass
class PairMetrics:
  """Error of one side against a reference (see :data:`PAIRS`).

  ``top1_agreement`` (fraction of rows whose argmax over the last axis agree)
  is set for model outputs whose last dimension is > 1 only.
  """
  max_abs: float
  mean_abs: float
  sqnr_db: float
  cosine: float
  top1_agreement: float | None = None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "PairMetrics":
    return cls(**{k: _num(v) for k, v in d.items()})


@dataclasses.dataclass
class OutputRow:
  """End-to-end metrics of one model output.

  Attributes:
    index: position among the model outputs.
    shape: of one LiteRT run (the export batch).
    scale: the int8 output's scale; None for a float output.
    metrics: ``{pair: PairMetrics}`` for the keys of :data:`PAIRS`.
    max_lsb: max ``|LiteRT - fake-quant| / scale``; None for a float output.
  """
  index: int
  shape: tuple[int, ...]
  scale: float | None
  metrics: dict[str, PairMetrics]
  max_lsb: float | None

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
  tensor that carries it.

  Attributes:
    key: the stats key, e.g. ``"Conv_0/conv_general_dilated"``.
    module_path: the Flax module path; ``""`` for model inputs.
    op: the primitive that produces the boundary.
    shape, scale, zero_point: of the boundary (scale / zero point from stats).
    tensor_index, tensor_name: the matched LiteRT tensor; None if unmatched.
    match: how it was matched, or why not.
    metrics: ``{metric: PairMetrics}`` for the keys of :data:`LAYER_METRICS`
      (those with LiteRT absent when unmatched).
    max_lsb: max ``|LiteRT - fake-quant| / scale``; None if unmatched.
    explorer_key: the Model Explorer node key: the tensor name when unique,
      else the producing op's index.
  """
  key: str
  module_path: str
  op: str
  shape: tuple[int, ...]
  scale: float
  zero_point: int
  tensor_index: int | None
  tensor_name: str | None
  match: str
  metrics: dict[str, PairMetrics]
  max_lsb: float | None
  explorer_key: str | None = None

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
  """What :func:`qlite.compare` returns: metrics of float JAX, fake-quant JAX
  and LiteRT against each other, per model output and per activation
  boundary. ``print(report)`` renders the tables.

  Example usage::

    >>> report = qlite.compare(model, rules, stats, "model.tflite", batches,
    ...                        variables=variables)
    >>> print(report)
    >>> [r.layer for r in report.worst(2)]      # lowest LiteRT SQNR first
    >>> report.to_json("r.json")
    >>> same = qlite.Report.from_json("r.json")

  Attributes:
    model: the model's description.
    tflite: the ``.tflite`` path, or ``"<bytes>"``.
    num_samples: LiteRT runs (of the export batch each).
    num_batches: batches given.
    outputs: one :class:`OutputRow` per model output.
    layers: one :class:`LayerRow` per boundary, in graph order.
    values: ``{boundary key: {side: array}}`` with the sides ``float``,
      ``fakequant``, ``own`` and (matched) ``litert``; ``keep_values=True``
      only, else None. Not serialised, not compared.
  """
  model: str
  tflite: str
  num_samples: int
  num_batches: int
  outputs: list[OutputRow]
  layers: list[LayerRow]
  values: dict[str, dict[str, np.ndarray]] | None = dataclasses.field(
      default=None, repr=False, compare=False)

  @property
  def unmatched(self) -> list[LayerRow]:
    """Boundaries with no LiteRT tensor found (their JAX metrics remain)."""
    return [r for r in self.layers if not r.matched]

  def layer(self, name: str) -> LayerRow:
    """Looks up one layer.

    Example: ``report.layer("Conv_1").sqnr("own_vs_float")``.

    Args:
      name: a module path or boundary key.

    Returns:
      The first row whose module path or key is ``name``.

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
    """The layers with the lowest SQNR.

    Example: ``report.worst(1, "own_vs_float")[0].layer``.

    Args:
      n: how many rows.
      metric: a key of :data:`LAYER_METRICS`.

    Returns:
      Up to ``n`` rows, lowest ``metric`` SQNR first; rows without
      ``metric`` (unmatched, for the LiteRT ones) are skipped.

    Raises:
      QliteError: unknown metric.
    """
    check_metric(metric)
    rows = [r for r in self.layers if r.sqnr(metric) is not None]
    return sorted(rows, key=lambda r: r.sqnr(metric))[:n]

  def table(self, worst: int | None = None,
            metric: str = "litert_vs_float") -> str:
    """Renders the report as aligned text tables (what ``str()`` gives).

    Example: ``print(report.table(worst=5, metric="own_vs_float"))``.

    Args:
      worst: how many rows to mark ``<-- worst`` (default: about 1 in 5
        rows, at most 3). Rows with infinite SQNR are never marked.
      metric: the :data:`LAYER_METRICS` key that ranks the rows.

    Returns:
      End-to-end tables per output, the per-layer table and the unmatched
      boundaries with the reason.

    Raises:
      QliteError: unknown metric.
    """
    marked = {id(self.layers[i]) for i in self.marked_worst(worst, metric)}
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
                   f"carries these values:")
      for r in self.unmatched:
        lines.append(f"  {r.key} ({r.op}, shape {tuple(r.shape)}, scale "
                     f"{r.scale:.6g}): {r.match}")
    else:
      lines.append("unmatched: none")
    return "\n".join(lines)

  def marked_worst(self, worst: int | None = None,
                   metric: str = "litert_vs_float") -> set[int]:
    """The indices (into :attr:`layers`) that :meth:`table` and
    :meth:`to_html` mark as worst.

    Args:
      worst: how many (default: about 1 in 5 rows, at most 3). Rows with
        infinite SQNR are never marked.
      metric: the :data:`LAYER_METRICS` key that ranks the rows.

    Raises:
      QliteError: unknown metric.
    """
    if worst is None:
      worst = min(3, max(1, math.ceil(len(self.layers) / 5)))
    index = {id(r): i for i, r in enumerate(self.layers)}
    return {index[id(r)] for r in self.worst(worst, metric)
            if r.sqnr(metric) != math.inf}

  def to_html(self, path=None, *, metric: str = "litert_vs_float",
              worst: int | None = None) -> str:
    """Renders the report as one self-contained HTML page: the end-to-end
    figures, a per-layer SQNR chart and a max-LSB chart in graph order
    (inline SVG; the worst layers in red, the module path on hover) and the
    per-layer table. Nothing is fetched from the network.

    Example: ``report.to_html("report.html")``, then open it in a browser.

    Args:
      path: a file to write the page to as well; None writes nothing.
      metric: the :data:`LAYER_METRICS` key charted and ranked.
      worst: how many layers to mark (as :meth:`table`).

    Returns:
      The HTML text.

    Raises:
      QliteError: unknown metric, or ``path`` cannot be written.
    """
    from qlite.analysis import html as html_report
    check_metric(metric)
    text = html_report.render(self, metric, worst)
    if path is not None:
      _write(path, text, encoding="utf-8")     # the page says charset utf-8
    return text

  def __str__(self) -> str:
    return self.table()

  def to_dict(self) -> dict:
    """Returns the report as a JSON-ready dict, without ``values``
    (``inf`` / ``nan`` as the strings ``"inf"``, ``"-inf"``, ``"nan"``)."""
    d = {"format": REPORT_FORMAT, "version": REPORT_VERSION,
         "model": self.model, "tflite": self.tflite,
         "num_samples": self.num_samples, "num_batches": self.num_batches,
         "outputs": [o.to_dict() for o in self.outputs],
         "layers": [r.to_dict() for r in self.layers],
         "unmatched": [r.key for r in self.unmatched]}
    return _finite_json(d)

  def to_json(self, path=None, *, indent: int | None = 1) -> str:
    """Serialises the report as standard JSON (non-finite numbers as
    strings); :meth:`from_json` reads it back.

    Example: ``report.to_json("r.json")``.

    Args:
      path: a file to write the text to as well; None writes nothing.
      indent: passed to ``json.dumps``.

    Returns:
      The JSON text.

    Raises:
      QliteError: ``path`` cannot be written.
    """
    text = json.dumps(self.to_dict(), indent=indent)
    if path is not None:
      _write(path, text)
    return text

  @classmethod
  def from_json(cls, text_or_path) -> "Report":
    """Reads a report written by :meth:`to_json` (``values`` is None).

    Example: ``qlite.Report.from_json("r.json").worst(1)``.

    Args:
      text_or_path: JSON text (starting with ``{``) or a file path.

    Returns:
      The :class:`Report`, equal to the one serialised.

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
    """Returns one flat dict per layer (the rows of :meth:`to_csv`)."""
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
    """Serialises the per-layer table as CSV: one row per boundary, metric
    columns named ``<metric>.<field>`` (``litert_vs_float.sqnr_db``, ...).

    Example: ``report.to_csv("r.csv")``.

    Args:
      path: a file to write the text to as well; None writes nothing.

    Returns:
      The CSV text.

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
    """Builds Model Explorer node data with each matched layer's SQNR.

    Keys are the LiteRT output tensor names (Model Explorer matches them to
    the node producing that tensor), or the producing op's index (its node
    id) where a name is not unique. Infinite SQNR is written as 200 dB.
    Thresholds colour < 20 dB red, < 30 orange, < 40 yellow, else green.

    Example: ``report.model_explorer_data("own_vs_float")["results"]``.

    Args:
      metric: the :data:`LAYER_METRICS` key whose SQNR (dB) is shown.
      name: the overlay's name (default: ``qlite SQNR dB (<metric>)``).

    Returns:
      A ``GraphNodeData`` dict of ``ai-edge-model-explorer``:
      ``{"name", "results": {key: {"value"}}, "thresholds"}``.

    Raises:
      QliteError: unknown metric.
    """
    check_metric(metric)
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
    """Writes :meth:`model_explorer_data` as JSON to ``path``.

    Example: ``report.to_model_explorer("overlay.json")``, then
    ``model-explorer model.tflite --node_data_paths=overlay.json``.

    Args:
      path: the JSON file to write.
      metric, name: as for :meth:`model_explorer_data`.

    Returns:
      The node data dict written.

    Raises:
      QliteError: unknown metric, or ``path`` cannot be written.
    """
    data = self.model_explorer_data(metric, name)
    _write(path, json.dumps(data, indent=1))
    return data


def check_metric(metric: str):
  """Raises QliteError unless ``metric`` is a key of :data:`LAYER_METRICS`."""
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


def _write(path, text: str, encoding: str | None = None):
  try:
    with open(path, "w", encoding=encoding) as f:
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
