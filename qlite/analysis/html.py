"""The compare report as one self-contained HTML page (:meth:`Report.to_html`).

No network: CSS is inline, the charts are inline SVG, nothing is fetched.
The page holds the end-to-end figures per model output, a per-layer SQNR
chart and a max-LSB chart in graph order (the worst layers drawn in a
distinct colour, each bar's ``<title>`` names the module path, shown on
hover; a bar links to its table row), and the per-layer table.

The SVG is well-formed XML and carries its figures as attributes, so tests
(and scripts) can read it back: each SQNR bar is a ``<rect>`` with
``class="bar"`` (``"bar worst"`` for a marked layer) and ``data-layer``,
``data-index``, ``data-sqnr`` attributes.
"""

from __future__ import annotations

import html
import math

__all__ = ["render"]

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
 margin:24px;color:#1d2330;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 6px}
.sub{color:#5a6272;margin:0 0 12px}
table{border-collapse:collapse;font-size:13px;margin:4px 0 10px}
th,td{padding:3px 9px;border-bottom:1px solid #e3e6eb;text-align:right;
 white-space:nowrap}
th{background:#f3f5f8;font-weight:600}
td.l,th.l{text-align:left}
tr.worst td{background:#fde8e6} tr:target td{outline:2px solid #3b6fd8}
.tag{display:inline-block;padding:0 6px;border-radius:8px;font-size:11px;
 background:#d93a2b;color:#fff}
.um{color:#9a5b00}
.chart{display:inline-block;max-width:calc(100% - 14px);overflow-x:auto;
 border:1px solid #e3e6eb;border-radius:6px;padding:6px;margin:4px 0 4px}
svg text{font:11px system-ui,sans-serif;fill:#3c4452}
svg .bar{fill:#4c7bd9} svg .bar.worst{fill:#d93a2b}
svg .bar.inf{fill:#a9c0ee} svg .lsb{fill:#7a8aa6} svg .lsb.worst{fill:#d93a2b}
svg a:hover rect{opacity:.75} svg .grid{stroke:#e3e6eb}
svg .ref{stroke:#d98b2b;stroke-dasharray:4 3}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px;
 vertical-align:-1px}
"""

_METRIC_LABEL = {
    "fakequant_vs_float": "fake-quant vs float",
    "litert_vs_float": "LiteRT vs float",
    "litert_vs_fakequant": "LiteRT vs fake-quant",
    "own_vs_float": "own (this boundary's scale only) vs float",
}


def render(report, metric: str = "litert_vs_float",
           worst: int | None = None) -> str:
  """Returns the report as one HTML page (see the module docstring).

  Args:
    report: a :class:`~qlite.analysis.report.Report`.
    metric: the ``LAYER_METRICS`` key charted and ranked.
    worst: how many layers to mark (default as :meth:`Report.table`).
  """
  marked = report.marked_worst(worst, metric)
  e = html.escape
  title = f"qlite compare: {report.model}"
  parts = [
      "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
      f"<title>{e(title)}</title>", f"<style>{_CSS}</style></head><body>",
      f"<h1>{e(title)}</h1>",
      f'<p class="sub">{e(report.tflite)} &middot; {report.num_samples} '
      f"LiteRT runs over {report.num_batches} batch(es) &middot; "
      f"{len(report.layers)} boundaries, {len(report.unmatched)} unmatched"
      f"</p>",
      "<h2>End to end</h2>"]
  for o in report.outputs:
    scale = "float" if o.scale is None else f"scale {o.scale:.6g}"
    parts.append(f"<p><b>output {o.index}</b> {e(str(tuple(o.shape)))} "
                 f"({scale})"
                 + ("" if o.max_lsb is None else
                    f" &middot; max |LiteRT &minus; fake-quant| = "
                    f"{o.max_lsb:.2f} LSB") + "</p>")
    rows = ["<table><tr><th class='l'>pair</th><th>SQNR dB</th>"
            "<th>cosine</th><th>top-1</th><th>max|err|</th>"
            "<th>mean|err|</th></tr>"]
    for name, m in o.metrics.items():
      rows.append(
          f"<tr><td class='l'>{e(name.replace('_vs_', ' vs '))}</td>"
          f"<td>{_db(m.sqnr_db)}</td><td>{m.cosine:.6f}</td>"
          f"<td>{'-' if m.top1_agreement is None else f'{100 * m.top1_agreement:.2f} %'}</td>"
          f"<td>{m.max_abs:.4g}</td><td>{m.mean_abs:.4g}</td></tr>")
    rows.append("</table>")
    parts += rows
  parts.append(f"<h2>Per layer: SQNR, {e(_METRIC_LABEL.get(metric, metric))}"
               f" (dB, graph order)</h2>")
  parts.append('<p class="legend"><span style="background:#4c7bd9"></span>'
               'SQNR<span style="background:#d93a2b"></span>worst '
               f'{len(marked)}<span style="background:#a9c0ee"></span>'
               "infinite (exact) &middot; hover a bar for the module path, "
               "click it for its table row</p>")
  parts.append('<div class="chart">' + sqnr_svg(report, metric, marked)
               + "</div>")
  parts.append("<h2>Per layer: max |LiteRT &minus; fake-quant| in LSB of "
               "the boundary's scale</h2>")
  parts.append('<div class="chart">' + lsb_svg(report, marked) + "</div>")
  parts.append("<h2>Table</h2>")
  parts.append(_layer_table(report, marked))
  if report.unmatched:
    parts.append(f"<h2>Unmatched ({len(report.unmatched)})</h2><ul>")
    for r in report.unmatched:
      parts.append(f"<li class='um'>{e(r.key)} ({e(r.op)}, shape "
                   f"{e(str(tuple(r.shape)))}): {e(r.match)}</li>")
    parts.append("</ul>")
  parts.append("</body></html>")
  return "\n".join(parts)


# Chart geometry (px).
_LEFT, _RIGHT, _TOP = 48, 12, 12


def _geometry(n: int):
  step = max(10, min(64, 900 // max(n, 1)))
  width = _LEFT + _RIGHT + step * max(n, 1)
  return step, width


def _labels(report, step: int, y0: int) -> list[str]:
  """x-axis labels: the layer names, rotated, when they fit; else every
  k-th index."""
  out = []
  n = len(report.layers)
  every = 1 if step >= 14 else math.ceil(14 / step)
  shared = _shared(report)
  for i, r in enumerate(report.layers):
    if i % every:
      continue
    x = _LEFT + step * i + step / 2
    label = _label(i, r, n, shared)
    out.append(f'<text x="{x:.1f}" y="{y0 + 10}" text-anchor="end" '
               f'transform="rotate(-50 {x:.1f} {y0 + 10})">'
               f"{html.escape(label)}</text>")
  if n > 60:
    out += _groups(report, step, y0 + 34)
  return out


def _groups(report, step: int, y: int) -> list[str]:
  """Under index-only labels: a bracket per run of consecutive layers in
  the same top-level module, named where it fits."""
  out, start = [], 0
  tops = [r.layer.split("/")[0] for r in report.layers]
  for i in range(1, len(tops) + 1):
    if i < len(tops) and tops[i] == tops[start]:
      continue
    x0, x1 = _LEFT + step * start + 2, _LEFT + step * i - 2
    if x1 - x0 >= 6:
      out.append(f'<line class="group" x1="{x0}" x2="{x1}" y1="{y}" '
                 f'y2="{y}" stroke="#8a93a3"/>')
      if x1 - x0 >= 6.5 * len(tops[start]):
        out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{y + 13}" '
                   f'text-anchor="middle">{html.escape(tops[start])}</text>')
    start = i
  return out


def _label(i: int, r, n: int, shared: set[str]) -> str:
  """``"<index> <layer>"`` (long paths cut to their end; the op added when
  several boundaries share the module path); the index alone for more than
  60 layers."""
  if n > 60:
    return str(i)
  name = r.layer if len(r.layer) <= 28 else "..." + r.layer[-25:]
  return f"{i} {name}" + (f" {r.op}" if r.layer in shared else "")


def _shared(report) -> set[str]:
  seen, shared = set(), set()
  for r in report.layers:
    (shared if r.layer in seen else seen).add(r.layer)
  return shared


def _tooltip(i: int, r, metric: str) -> str:
  lsb = "-" if r.max_lsb is None else f"{r.max_lsb:.2f}"
  return (f"#{i} {r.layer}\nkey {r.key}\nop {r.op}, shape "
          f"{tuple(r.shape)}, scale {r.scale:.4g}\n{metric}: "
          f"{_db(r.sqnr(metric))} dB\nown vs float: "
          f"{_db(r.sqnr('own_vs_float'))} dB\nmax LSB: {lsb}"
          + ("" if r.matched else "\nUNMATCHED: " + r.match))


def sqnr_svg(report, metric: str, marked: set[int]) -> str:
  """The per-layer SQNR bar chart: ``marked`` holds the indices (into
  ``report.layers``) drawn as worst."""
  e = html.escape
  n = len(report.layers)
  step, width = _geometry(n)
  plot_h = 220
  y0 = _TOP + plot_h
  shared = _shared(report)
  longest = max((len(_label(i, r, n, shared))
                 for i, r in enumerate(report.layers)), default=1)
  height = y0 + 24 + int(5.2 * longest) + (26 if n > 60 else 0)
  vals = [r.sqnr(metric) for r in report.layers]
  finite = [v for v in vals if v is not None and math.isfinite(v)]
  top = max(10.0, math.ceil((max(finite) if finite else 10.0) / 10) * 10)
  if any(v == math.inf for v in vals) and top - max(finite, default=0) < 5:
    top += 10
  bottom = min(0.0, math.floor(min(finite, default=0.0) / 10) * 10)

  def y(v):
    return _TOP + plot_h * (top - v) / (top - bottom)
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="sqnr-chart" '
         f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
         f'data-metric="{e(metric)}">']
  tick = 10 if top - bottom <= 80 else 20
  v = bottom
  while v <= top + 1e-9:
    out.append(f'<line class="grid" x1="{_LEFT}" x2="{width - _RIGHT}" '
               f'y1="{y(v):.1f}" y2="{y(v):.1f}"/>')
    out.append(f'<text x="{_LEFT - 6}" y="{y(v) + 4:.1f}" '
               f'text-anchor="end">{v:g}</text>')
    v += tick
  out.append(f'<text x="12" y="{_TOP + plot_h / 2:.0f}" text-anchor="middle" '
             f'transform="rotate(-90 12 {_TOP + plot_h / 2:.0f})">'
             f"SQNR dB</text>")
  for i, (r, v) in enumerate(zip(report.layers, vals)):
    x = _LEFT + step * i + 1
    w = max(step - 2, 1)
    tip = f"<title>{e(_tooltip(i, r, metric))}</title>"
    if v is None or math.isnan(v):
      out.append(f'<text x="{x + w / 2:.1f}" y="{y0 - 4:.1f}" '
                 f'text-anchor="middle" data-index="{i}">&#215;{tip}</text>')
      continue
    cls = "bar" + (" worst" if i in marked else "") + (
        " inf" if v == math.inf else "")
    shown = top if v == math.inf else v
    ya, yb = sorted((y(shown), y(0.0)))
    out.append(
        f'<a href="#row-{i}"><rect class="{cls}" x="{x:.1f}" y="{ya:.1f}" '
        f'width="{w}" height="{max(yb - ya, 0.5):.1f}" '
        f'data-index="{i}" data-layer="{e(r.layer)}" '
        f'data-sqnr="{_attr_num(v)}">{tip}</rect></a>')
    if i in marked and step >= 28:     # narrower: the value is on hover
      out.append(f'<text x="{x + w / 2:.1f}" y="{ya - 3:.1f}" '
                 f'text-anchor="middle" style="fill:#d93a2b">'
                 f"{v:.1f}</text>")
  out.append(f'<line x1="{_LEFT}" x2="{width - _RIGHT}" y1="{y(0):.1f}" '
             f'y2="{y(0):.1f}" stroke="#3c4452"/>')
  out += _labels(report, step, y0)
  out.append("</svg>")
  return "".join(out)


def lsb_svg(report, marked: set[int]) -> str:
  """Per-layer max |LiteRT - fake-quant| / scale; a dashed line at 1 LSB."""
  e = html.escape
  n = len(report.layers)
  step, width = _geometry(n)
  plot_h = 90
  y0 = _TOP + plot_h
  height = y0 + 22
  vals = [r.max_lsb for r in report.layers]
  finite = [v for v in vals if v is not None and math.isfinite(v)]
  top = max(2.0, math.ceil(max(finite, default=0.0)))

  def y(v):
    return _TOP + plot_h * (top - min(v, top)) / top
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="lsb-chart" '
         f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
  for v in (0.0, 1.0, top):
    out.append(f'<text x="{_LEFT - 6}" y="{y(v) + 4:.1f}" '
               f'text-anchor="end">{v:g}</text>')
  out.append(f'<line class="ref" x1="{_LEFT}" x2="{width - _RIGHT}" '
             f'y1="{y(1.0):.1f}" y2="{y(1.0):.1f}"/>')
  for i, (r, v) in enumerate(zip(report.layers, vals)):
    x = _LEFT + step * i + 1
    w = max(step - 2, 1)
    tip = f"<title>{e(_tooltip(i, r, 'litert_vs_fakequant'))}</title>"
    if v is None or not math.isfinite(v):
      out.append(f'<text x="{x + w / 2:.1f}" y="{y0 - 4:.1f}" '
                 f'text-anchor="middle">&#215;{tip}</text>')
      continue
    cls = "lsb" + (" worst" if i in marked else "")
    out.append(f'<a href="#row-{i}"><rect class="{cls}" x="{x:.1f}" '
               f'y="{y(v):.1f}" width="{w}" '
               f'height="{max(y0 - y(v), 0.5):.1f}" data-index="{i}" '
               f'data-layer="{e(r.layer)}" data-lsb="{v:.6g}">{tip}</rect></a>')
  out.append(f'<line x1="{_LEFT}" x2="{width - _RIGHT}" y1="{y0}" '
             f'y2="{y0}" stroke="#3c4452"/>')
  out.append(f'<text x="{_LEFT}" y="{height - 4}">layer # as above; dashed: '
             f"1 LSB</text>")
  out.append("</svg>")
  return "".join(out)


def _layer_table(report, marked: set[int]) -> str:
  e = html.escape
  head = ["#", "layer", "op", "shape", "scale", "fq~float", "lite~float",
          "lite~fq", "own", "LSB", "LiteRT tensor"]
  left = {1, 2, 3, 10}
  rows = ["<table id='layers'><tr>" + "".join(
      f"<th{' class=l' if i in left else ''}>{e(h)}</th>"
      for i, h in enumerate(head)) + "</tr>"]
  for i, r in enumerate(report.layers):
    cells = [str(i), r.layer, r.op, str(tuple(r.shape)), f"{r.scale:.4g}"]
    cells += [_db(r.sqnr(k)) for k in ("fakequant_vs_float",
                                       "litert_vs_float",
                                       "litert_vs_fakequant", "own_vs_float")]
    name = r.tensor_name or ""
    cells += ["-" if r.max_lsb is None else f"{r.max_lsb:.2f}",
              (f"#{r.tensor_index} "
               + (name if len(name) <= 40 else name[:37] + "..."))
              if r.matched else "UNMATCHED"]
    titles = {1: r.key, 10: name if r.matched else r.match}
    tds = "".join(_td(c, left=j in left, title=titles.get(j),
                      tag=j == 1 and i in marked)
                  for j, c in enumerate(cells))
    cls = " class='worst'" if i in marked else ""
    rows.append(f"<tr id='row-{i}'{cls}>{tds}</tr>")
  rows.append("</table>")
  return "".join(rows)


def _td(text: str, left: bool, title: str | None, tag: bool = False) -> str:
  attrs = (" class=l" if left else "") + (
      "" if title is None else f' title="{html.escape(title)}"')
  mark = " <span class='tag'>worst</span>" if tag else ""
  return f"<td{attrs}>{html.escape(text)}{mark}</td>"


def _db(x) -> str:
  if x is None:
    return "-"
  if x == math.inf:
    return "inf"
  if x == -math.inf:
    return "-inf"
  return f"{x:.1f}"


def _attr_num(v: float) -> str:
  return "inf" if v == math.inf else f"{v:.4f}"
