"""Report.to_html / `qlite compare --html`: one self-contained page whose
SVG chart marks the layer with an injected wrong scale as the worst (the
case of tests/test_compare.py), and opens in headless Chromium."""

import html.parser
import math
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import qlite
from qlite.analysis.report import Report

SVG_NS = "{http://www.w3.org/2000/svg}"


def _scaled_stats(stats, key, factor):
  records = {k: {s: np.array(v) for s, v in r.items()}
             for k, r in stats.records.items()}
  records[key]["max"] = records[key]["max"] * factor
  return qlite.QuantStats(records, stats.meta)


@pytest.fixture(scope="module")
def wrong_scale_report(digits_data, digits_trained, digits_export,
                       int8_rules):
  """Conv_1's calibrated max x 50 (as test_compare): its int8 scale is 50x
  too coarse."""
  model, variables = digits_trained
  stats, _ = digits_export
  bad = _scaled_stats(stats, "Conv_1/conv_general_dilated", 50.0)
  blob = qlite.export_tflite(model, int8_rules, bad, digits_data.x_test[:1],
                             variables=variables)
  return qlite.compare(model, int8_rules, bad, blob,
                       [digits_data.x_test[:64]], variables=variables,
                       progress=False)


def _svg(page: str, chart_id: str) -> ET.Element:
  m = re.search(rf'<svg [^>]*id="{chart_id}".*?</svg>', page, re.S)
  assert m, f"no svg #{chart_id}"
  return ET.fromstring(m.group(0))       # the SVG is well-formed XML


def _bars(svg: ET.Element, cls: str) -> list[ET.Element]:
  return [r for r in svg.iter(f"{SVG_NS}rect")
          if cls in r.get("class", "").split()]


class _Collect(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.tags, self.rows = [], {}
    self._row = None

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    self.tags.append((tag, a))
    if tag == "tr" and (a.get("id") or "").startswith("row-"):
      self._row = a["id"]
      self.rows[self._row] = {"class": a.get("class"), "text": []}

  def handle_endtag(self, tag):
    if tag == "tr":
      self._row = None

  def handle_data(self, data):
    if self._row:
      self.rows[self._row]["text"].append(data)


def test_chart_marks_the_wrong_scale_layer_worst(wrong_scale_report,
                                                 tmp_path):
  rep = wrong_scale_report
  p = tmp_path / "r.html"
  page = rep.to_html(p)
  assert p.read_text() == page
  for metric in ("litert_vs_float", "own_vs_float", "fakequant_vs_float"):
    svg = _svg(rep.to_html(metric=metric), "sqnr-chart")
    assert svg.get("data-metric") == metric
    bars = _bars(svg, "bar")
    # One bar per layer, in graph order.
    assert [b.get("data-layer") for b in bars] == [r.layer
                                                   for r in rep.layers]
    worst = _bars(svg, "worst")
    assert worst, metric
    # The lowest bar is Conv_1, and it is drawn as worst.
    lowest = min(bars, key=lambda b: float(b.get("data-sqnr")))
    assert lowest.get("data-layer") == "Conv_1", metric
    assert lowest in worst
    # The bar's height is its SQNR: lowest bar is the shortest of the
    # positive ones, and its hover title names the module path.
    title = lowest.find(f"{SVG_NS}title").text
    assert title.startswith("#2 Conv_1\n") and "conv_general_dilated" in title
    assert float(lowest.get("data-sqnr")) == pytest.approx(
        rep.layer("Conv_1").sqnr(metric), abs=1e-3)
  # The default marks 1 of the 5 rows: Conv_1 only (as the text table).
  svg = _svg(page, "sqnr-chart")
  assert [b.get("data-layer") for b in _bars(svg, "worst")] == ["Conv_1"]
  conv1 = next(b for b in _bars(svg, "bar") if b.get("data-layer") ==
               "Conv_1")
  others = [b for b in _bars(svg, "bar") if b is not conv1
            and math.isfinite(float(b.get("data-sqnr")))]
  assert all(float(conv1.get("height")) < float(b.get("height"))
             for b in others)
  assert rep.layer("Conv_1").sqnr("litert_vs_float") < 20.0
  # LSB chart: one bar per matched layer, marked the same way.
  lsb = _svg(page, "lsb-chart")
  assert [b.get("data-layer") for b in _bars(lsb, "worst")] == ["Conv_1"]
  assert len(_bars(lsb, "lsb")) == len(rep.layers)
  # The table: one row per layer, Conv_1's row marked.
  c = _Collect()
  c.feed(page)
  assert len(c.rows) == len(rep.layers)
  assert c.rows["row-2"]["class"] == "worst"
  assert [t.strip() for t in c.rows["row-2"]["text"]][1:3] == ["Conv_1",
                                                           "worst"]
  assert [k for k, v in c.rows.items() if v["class"] == "worst"] == ["row-2"]
  # The end-to-end figures are on the page.
  e2e = rep.outputs[0].metrics["litert_vs_float"]
  assert f"{e2e.sqnr_db:.1f}" in page and f"{e2e.cosine:.6f}" in page
  # More marked on request; an unknown metric is a named error.
  svg3 = _svg(rep.to_html(worst=3), "sqnr-chart")
  assert len(_bars(svg3, "worst")) == 3
  with pytest.raises(qlite.QliteError, match="unknown metric"):
    rep.to_html(metric="snr")


def test_page_is_self_contained(wrong_scale_report):
  page = wrong_scale_report.to_html()
  c = _Collect()
  c.feed(page)
  tags = {t for t, _ in c.tags}
  assert {"html", "style", "svg", "table"} <= tags
  assert not tags & {"script", "link", "img", "iframe", "object"}, tags
  for tag, attrs in c.tags:
    for k in ("src", "href"):
      v = attrs.get(k)
      assert v is None or v.startswith("#"), (tag, attrs)
  assert "url(" not in page and "@import" not in page
  # Only the SVG namespace names a URL.
  assert set(re.findall(r"https?://[^\"' ]+", page)) == {
      "http://www.w3.org/2000/svg"}


def test_json_roundtrip_renders_the_same_page(wrong_scale_report):
  rep = wrong_scale_report
  back = Report.from_json(rep.to_json())
  assert back.to_html() == rep.to_html()


def test_cli_compare_html(tmp_path, capsys, tiny_cli_entry):
  from qlite import cli
  mod = tiny_cli_entry("qlite_html_entry_mod")
  out = tmp_path / "tiny.tflite"
  assert cli.main(["export", f"{mod}:make", "--out", str(out),
                   "--no-progress"]) == 0
  capsys.readouterr()
  assert cli.main(["compare", f"{mod}:make", str(out), "--no-progress",
                   "--html", "r.html", "--json", "r.json"]) == 0
  assert "wrote r.html" in capsys.readouterr().out
  page = (tmp_path / "r.html").read_text()
  svg = _svg(page, "sqnr-chart")
  assert [b.get("data-layer") for b in _bars(svg, "bar")] == [
      "input0", "Dense_0", "Dense_1"]
  assert page == Report.from_json(tmp_path / "r.json").to_html()
  # A directory that does not exist is refused before any work.
  assert cli.main(["compare", f"{mod}:make", str(out), "--no-progress",
                   "--html", "nodir/r.html"]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_headless_chromium_renders_the_page(wrong_scale_report, tmp_path):
  browser = shutil.which("chromium") or shutil.which("chromium-browser")
  if browser is None:
    pytest.skip("chromium is not on PATH (`make report-screenshot` installs "
                "it with apt-get install -y chromium)")
  page = tmp_path / "r.html"
  wrong_scale_report.to_html(page)
  png = tmp_path / "r.png"
  # --dump-dom: the DOM after parsing, scripts run: the chart is there.
  dom = subprocess.run(
      [browser, "--headless", "--no-sandbox", "--disable-gpu",
       "--dump-dom", page.as_uri()], capture_output=True, text=True,
      timeout=120)
  assert dom.returncode == 0, dom.stderr[-2000:]
  assert 'class="bar worst"' in dom.stdout and "Conv_1" in dom.stdout
  shot = subprocess.run(
      [browser, "--headless", "--no-sandbox", "--disable-gpu",
       "--hide-scrollbars", f"--screenshot={png}", "--window-size=1100,900",
       page.as_uri()], capture_output=True, text=True, timeout=120)
  assert shot.returncode == 0, shot.stderr[-2000:]
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(png) > 10_000


def _synthetic_report(n):
  """n layers in EncoderLayer_0 / EncoderLayer_1; layer 5 exact (inf dB),
  layer 7 unmatched, layer 40 the worst."""
  from qlite.analysis.report import LayerRow, OutputRow, PairMetrics
  rows = []
  for i in range(n):
    sq = 30.0 + (i % 7)
    if i == 5:
      sq = math.inf
    if i == 40:
      sq = 3.5
    m = {"fakequant_vs_float": PairMetrics(0.1, 0.01, sq, 0.99),
         "own_vs_float": PairMetrics(0.1, 0.01, sq, 0.99)}
    if i != 7:
      m["litert_vs_float"] = PairMetrics(0.1, 0.01, sq, 0.99)
      m["litert_vs_fakequant"] = PairMetrics(0.1, 0.01, 50.0, 0.99)
    path = f"EncoderLayer_{i * 2 // n}/Dense_{i % 5}"
    rows.append(LayerRow(f"{path}/dot_general", path, "dot_general",
                         (1, 8), 0.01, 0, None if i == 7 else i,
                         None if i == 7 else f"t{i}",
                         "no LiteRT tensor" if i == 7 else "by scale", m,
                         None if i == 7 else 1.0))
  out = OutputRow(0, (1, 8), 0.01, {
      k: PairMetrics(0.1, 0.01, 30.0, 0.99, 1.0) for k in
      ("fakequant_vs_float", "litert_vs_float", "litert_vs_fakequant")}, 1.0)
  return Report("synthetic", "<bytes>", 4, 1, [out], rows)


def test_many_layers_inf_and_unmatched():
  rep = _synthetic_report(80)
  page = rep.to_html()
  svg = _svg(page, "sqnr-chart")
  bars = _bars(svg, "bar")
  assert len(bars) == 79                      # the unmatched one: no bar
  assert 7 not in {int(b.get("data-index")) for b in bars}
  lowest = min(bars, key=lambda b: float(b.get("data-sqnr")))
  assert lowest.get("data-index") == "40" and lowest in _bars(svg, "worst")
  assert len(_bars(svg, "worst")) == 3
  inf = _bars(svg, "inf")
  assert [b.get("data-index") for b in inf] == ["5"]
  assert "5" not in [b.get("data-index") for b in _bars(svg, "worst")]
  assert inf[0].get("data-sqnr") == "inf"
  # The exact layer's bar reaches the top of the axis: the tallest bar.
  assert float(inf[0].get("height")) == max(float(b.get("height"))
                                            for b in bars)
  texts = ["".join(t.itertext()) for t in svg.iter(f"{SVG_NS}text")]
  # > 60 layers: index labels, module groups under them, no value labels.
  assert "EncoderLayer_0" in texts and "EncoderLayer_1" in texts
  assert "40" in texts and not any(t.startswith("40 ") for t in texts)
  assert "3.5" not in texts
  # The unmatched layer is listed with its reason.
  assert "Unmatched (1)" in page and "no LiteRT tensor" in page


def test_written_as_utf8_and_bad_path_named(tmp_path):
  rep = _synthetic_report(6)
  rep.model = "linen:Modèle<µ>"
  p = tmp_path / "r.html"
  page = rep.to_html(p)
  assert p.read_bytes().decode("utf-8") == page
  assert "linen:Modèle&lt;µ&gt;" in page and '<meta charset="utf-8">' in page
  with pytest.raises(qlite.QliteError, match="cannot write"):
    rep.to_html(tmp_path / "missing" / "r.html")
