"""qlite.compare: float JAX vs fake-quant JAX vs LiteRT, end to end and per
layer, on the digits CNN; report serialisation; CLI; sensitivity helpers."""

import csv
import io
import json
import math

import numpy as np
import pytest

import qlite
from qlite.analysis.report import LAYER_METRICS, PAIRS, Report
from qlite.metrics import (cosine, cosine_from_sums, sqnr_db,
                           sqnr_db_from_power)

DIGITS_LAYERS = ["input0", "Conv_0", "Conv_1", "Dense_0", "Dense_1"]


@pytest.fixture(scope="module")
def digits_report(digits_data, digits_trained, digits_export, int8_rules):
  """Report on 120 test images given as one batch (run as 120 batch-1
  LiteRT chunks), with every layer's values kept."""
  model, variables = digits_trained
  stats, blob = digits_export
  return qlite.compare(model, int8_rules, stats, blob,
                       [digits_data.x_test[:120]], variables=variables,
                       progress=False, keep_values=True)


def test_one_row_per_boundary_keyed_by_module_path(digits_report,
                                                   digits_trained,
                                                   digits_export, int8_rules,
                                                   digits_data):
  rep = digits_report
  assert [r.layer for r in rep.layers] == DIGITS_LAYERS
  stats, _ = digits_export
  # One row per plan boundary, in graph order, all matched to a LiteRT tensor.
  model, variables = digits_trained
  qm = qlite.quantize_model(model, qlite.annotate.ConversionProvider(
      int8_rules, stats), variables=variables)
  _, plan = qm.traced((digits_data.x_test[:1],))
  assert [r.key for r in rep.layers] == [b.key for b in
                                         plan.boundaries.values()]
  assert rep.unmatched == []
  assert all(r.matched and "scale" in r.match for r in rep.layers)
  assert rep.num_samples == 120 and rep.num_batches == 1
  text = str(rep)
  for name in DIGITS_LAYERS:
    assert name in text
  assert text.count("<-- worst") == 1
  assert "SQNR" in text and "unmatched: none" in text
  # Aligned: every per-layer row has its SQNR column at the same offset.
  lines = text.splitlines()
  head = next(i for i, l in enumerate(lines) if "fq~float" in l)
  col = lines[head].index("fq~float") + len("fq~float")
  for line in lines[head + 1:head + 1 + len(DIGITS_LAYERS)]:
    assert line[col - 1] != " "


def test_litert_matches_fake_quant_within_2_lsb(digits_report):
  rep = digits_report
  (out,) = rep.outputs
  assert out.scale is not None and out.max_lsb <= 2.0
  assert out.metrics["litert_vs_float"].top1_agreement >= 0.99
  assert out.metrics["litert_vs_float"].sqnr_db >= 35.0
  for r in rep.layers:
    assert r.max_lsb <= 2.0, r
    assert r.sqnr("litert_vs_fakequant") >= 45.0, r


def test_sqnr_figures_match_metrics_computed_directly(digits_report,
                                                      digits_trained,
                                                      digits_data):
  rep = digits_report
  model, variables = digits_trained
  x = digits_data.x_test[:120]
  ref = np.asarray(model.apply(variables, x))
  # The captured values are the real ones: the model input and the logits.
  np.testing.assert_array_equal(rep.values["input0"]["float"], x)
  np.testing.assert_allclose(rep.values["Dense_1/dot_general"]["float"]
                             .reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
  sides = {"float": ref}
  for r in rep.layers:
    v = rep.values[r.key]
    for name, (a, b) in LAYER_METRICS.items():
      m = r.metrics[name]
      assert m.sqnr_db == pytest.approx(sqnr_db(v[a], v[b]), rel=1e-9,
                                        abs=1e-9), (r.key, name)
      assert m.cosine == pytest.approx(cosine(v[a], v[b]), abs=1e-9)
      assert m.max_abs == pytest.approx(
          float(np.max(np.abs(v[a].astype(np.float64) - v[b]))), abs=1e-9)
  (out,) = rep.outputs
  last = rep.values["Dense_1/dot_general"]
  sides = {"float": last["float"], "fakequant": last["fakequant"],
           "litert": last["litert"]}
  for name, (a, b) in PAIRS.items():
    m = out.metrics[name]
    assert m.sqnr_db == pytest.approx(sqnr_db(sides[a], sides[b]), abs=1e-6)
    agree = np.mean(np.argmax(sides[a], -1) == np.argmax(sides[b], -1))
    assert m.top1_agreement == pytest.approx(agree)


def _scaled_stats(stats, key, factor):
  records = {k: {s: np.array(v) for s, v in r.items()}
             for k, r in stats.records.items()}
  records[key]["max"] = records[key]["max"] * factor
  return qlite.QuantStats(records, stats.meta)


@pytest.mark.parametrize("key", ["Conv_1/conv_general_dilated",
                                 "Dense_0/dot_general"])
def test_wrong_scale_makes_that_layer_the_worst(key, digits_data,
                                                digits_trained, digits_export,
                                                int8_rules):
  model, variables = digits_trained
  stats, _ = digits_export
  bad = _scaled_stats(stats, key, 50.0)
  blob = qlite.export_tflite(model, int8_rules, bad, digits_data.x_test[:1],
                             variables=variables)
  rep = qlite.compare(model, int8_rules, bad, blob, [digits_data.x_test[:64]],
                      variables=variables, progress=False)
  layer = key.split("/")[0]
  for metric in ("litert_vs_float", "fakequant_vs_float", "own_vs_float"):
    assert rep.worst(1, metric)[0].layer == layer, (metric, str(rep))
  assert rep.layer(layer).sqnr("own_vs_float") < 20.0
  sensitive = qlite.find_sensitive_layers(rep, min_sqnr_db=30.0)
  assert sensitive[0] == layer
  assert qlite.find_sensitive_layers(rep, 30.0, metric="own_vs_float") == \
      [layer]
  assert "<-- worst" in next(l for l in str(rep).splitlines()
                             if f" {layer} " in l)


def test_rules_keeping_float(digits_report, int8_rules):
  assert qlite.find_sensitive_layers(digits_report, min_sqnr_db=0.0) == []
  worst_first = qlite.find_sensitive_layers(digits_report, min_sqnr_db=1e9)
  assert sorted(worst_first) == sorted(DIGITS_LAYERS[1:])   # no "input0"
  sq = [digits_report.layer(p).sqnr("fakequant_vs_float") for p in worst_first]
  assert sq == sorted(sq)
  rules = qlite.rules_keeping_float(["Conv_1", "Dense_0"], int8_rules)
  assert len(rules) == len(int8_rules) + 2
  assert rules[0].act_qtype is None and rules[0].weight_qtype is None
  assert rules[0].matches("Conv_1", "conv_general_dilated")
  assert not rules[0].matches("Conv_10", "conv_general_dilated")
  assert rules[2:] == list(int8_rules)
  with pytest.raises(qlite.QliteError, match="list of module paths"):
    qlite.rules_keeping_float("Conv_1", int8_rules)
  with pytest.raises(qlite.QliteError, match="unknown metric"):
    qlite.find_sensitive_layers(digits_report, metric="snr")


def test_json_and_csv_roundtrip(digits_report, tmp_path):
  rep = digits_report
  p = tmp_path / "r.json"
  text = rep.to_json(p)
  assert p.read_text() == text
  json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
  back = Report.from_json(p)
  assert back == rep
  assert Report.from_json(text) == rep
  assert [r.key for r in back.unmatched] == []
  assert str(back) == str(rep)
  with pytest.raises(qlite.QliteError, match="not a qlite compare report"):
    Report.from_json('{"format": "other"}')

  c = tmp_path / "r.csv"
  text = rep.to_csv(c)
  assert c.read_text() == text
  rows = list(csv.DictReader(io.StringIO(text)))
  assert [r["layer"] for r in rows] == DIGITS_LAYERS
  for row, layer in zip(rows, rep.layers):
    assert row["key"] == layer.key
    assert int(row["tensor_index"]) == layer.tensor_index
    for name in LAYER_METRICS:
      assert float(row[f"{name}.sqnr_db"]) == layer.sqnr(name)
    assert float(row["max_lsb"]) == layer.max_lsb


def test_model_explorer_node_data(digits_report, digits_export, tmp_path):
  rep = digits_report
  _, blob = digits_export
  p = tmp_path / "me.json"
  data = rep.to_model_explorer(p)
  loaded = json.loads(p.read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
  assert loaded == data
  # GraphNodeData: {"name", "results": {tensor name: {"value"}}, "thresholds"}
  assert set(loaded) == {"name", "results", "thresholds"}
  names = {t.name for t in qlite.inspect_tflite(blob).tensors}
  # Digits tensor names are unique: every key is a LiteRT tensor name.
  assert all(r.explorer_key == r.tensor_name for r in rep.layers)
  assert set(loaded["results"]) == {r.tensor_name for r in rep.layers}
  assert set(loaded["results"]) <= names
  for r in rep.layers:
    assert loaded["results"][r.tensor_name]["value"] == pytest.approx(
        r.sqnr("litert_vs_float"), abs=1e-3)
  values = [t["value"] for t in loaded["thresholds"]]
  assert values == sorted(values)

  pytest.importorskip("model_explorer", reason="ai-edge-model-explorer is "
                      "not installed (pip install ai-edge-model-explorer)")
  import dacite
  from model_explorer import node_data_builder as ndb
  from model_explorer.builtin_tflite_flatbuffer_adapter import \
      BuiltinTfliteFlatbufferAdapter
  gnd = dacite.from_dict(ndb.GraphNodeData, loaded,
                         config=dacite.Config(strict=True))
  assert all(isinstance(v, ndb.NodeDataResult) for v in gnd.results.values())
  assert all(isinstance(t, ndb.ThresholdItem) for t in gnd.thresholds)
  dumped = json.loads(gnd.to_json_string())
  assert {k: dumped[k] for k in loaded} == loaded
  # Every key names an output tensor of a node of the graph Model Explorer
  # builds from the .tflite (that is how it attaches node data).
  model_path = tmp_path / "m.tflite"
  model_path.write_bytes(blob)
  graph = BuiltinTfliteFlatbufferAdapter().convert(
      str(model_path), {})["graphCollections"][0].graphs[0]
  tensor_names = {a["value"] for n in graph["nodes"]
                  for m in n.get("outputsMetadata", [])
                  for a in m["attrs"] if a["key"] == "tensor_name"}
  assert set(loaded["results"]) <= tensor_names


def test_batch_chunking_and_errors(digits_data, digits_trained, digits_export,
                                   int8_rules, digits_report):
  model, variables = digits_trained
  stats, blob = digits_export
  x = digits_data.x_test[:120]
  # Same rows as one 120-row batch, given as 40 + 80 (tuple batches too).
  rep = qlite.compare(model, int8_rules, stats, blob, [x[:40], (x[40:],)],
                      variables=variables, progress=False)
  assert rep.num_samples == 120 and rep.num_batches == 2
  for a, b in zip(rep.layers, digits_report.layers):
    assert a.sqnr("litert_vs_float") == pytest.approx(
        b.sqnr("litert_vs_float"), abs=1e-9)
  with pytest.raises(qlite.QliteError, match=r"takes \(1, 8, 8, 1\)"):
    qlite.compare(model, int8_rules, stats, blob, [x[:, :4]],
                  variables=variables, progress=False)
  with pytest.raises(qlite.QliteError, match="empty"):
    qlite.compare(model, int8_rules, stats, blob, [], variables=variables,
                  progress=False)
  with pytest.raises(qlite.QliteError, match="variables"):
    qlite.compare(model, int8_rules, stats, blob, [x], progress=False)
  with pytest.raises(qlite.TFLiteFormatError):
    qlite.compare(model, int8_rules, stats, b"nope", [x],
                  variables=variables, progress=False)


def test_cli_compare(tmp_path, capsys, tiny_cli_entry):
  from qlite import cli
  mod = tiny_cli_entry("qlite_cmp_entry_mod")
  out = tmp_path / "tiny.tflite"
  assert cli.main(["export", f"{mod}:make", "--out", str(out)]) == 0
  capsys.readouterr()
  assert cli.main(["compare", f"{mod}:make", str(out), "--no-progress",
                   "--json", "r.json", "--csv", "r.csv",
                   "--model-explorer", "me.json"]) == 0
  printed = capsys.readouterr().out
  assert "Dense_0" in printed and "Dense_1" in printed
  assert "<-- worst" in printed and "unmatched: none" in printed
  rep = Report.from_json(tmp_path / "r.json")
  assert [r.layer for r in rep.layers] == ["input0", "Dense_0", "Dense_1"]
  assert rep.num_samples == 24 and rep.outputs[0].max_lsb <= 2.0
  assert (tmp_path / "r.csv").read_text().startswith("index,layer,")
  assert "results" in json.loads((tmp_path / "me.json").read_text())
  assert cli.main(["compare", "nomodule_xyz:make", str(out)]) == 2
  assert "cannot import" in capsys.readouterr().err


@pytest.mark.slow
def test_transformer_rows_and_error_growth_with_depth():
  from qlite.zoo import registry
  z = registry.get("transformer/linen")
  rules = [qlite.QuantizationRule(module_path=r".*", weight_qtype="int8",
                                  act_qtype="int8")]
  stats = qlite.calibrate(z.model, rules, z.batches, variables=z.variables,
                          progress=False)
  blob = qlite.export_tflite(z.model, rules, stats, z.example_args,
                             variables=z.variables, strict=False)
  rep = qlite.compare(z.model, rules, stats, blob, z.batches,
                      variables=z.variables, progress=False)
  # One row per boundary: every calibrated one, plus fixed-range ones
  # (softmax) that need no statistics.
  assert set(stats.keys()) <= {r.key for r in rep.layers}
  assert len({r.key for r in rep.layers}) == len(rep.layers)
  assert rep.unmatched == []
  assert any(r.module_path.startswith("EncoderLayer_1/") for r in rep.layers)
  # Sanity: error accumulates with depth (monotonic-ish): the first quarter
  # of the matmul outputs is cleaner than the last (measured 32.5 vs 27.7 dB).
  sq = [r.sqnr("fakequant_vs_float") for r in rep.layers
        if r.op == "dot_general"]
  q = len(sq) // 4
  assert q >= 3
  assert np.mean(sq[:q]) > np.mean(sq[-q:]) + 2.0
  # LiteRT follows fake-quant closely everywhere (measured: >= 29 dB).
  assert min(r.sqnr("litert_vs_fakequant") for r in rep.layers) >= 25.0


def test_nnx_model_rows_are_attribute_paths(digits_data, digits_trained,
                                            int8_rules):
  from qlite.zoo import digits
  _, variables = digits_trained
  m = digits.linen_to_nnx(variables)
  stats = qlite.calibrate(m, int8_rules, digits_data.batches(32, 4),
                          progress=False)
  blob = qlite.export_tflite(m, int8_rules, stats, digits_data.x_test[:1])
  rep = qlite.compare(m, int8_rules, stats, blob, [digits_data.x_test[:20]],
                      progress=False)
  assert [r.layer for r in rep.layers] == ["input0", "conv1", "conv2", "fc1",
                                           "fc2"]
  assert rep.unmatched == [] and rep.outputs[0].max_lsb <= 2.0


def test_metrics_from_sums_equal_array_forms():
  rng = np.random.default_rng(0)
  ref = rng.normal(size=(6, 7))
  test = ref + 0.01 * rng.normal(size=ref.shape)
  r, t = ref.ravel(), test.ravel()
  e = r - t
  assert sqnr_db_from_power(float(np.sum(r * r)), float(np.sum(e * e))) == \
      sqnr_db(ref, test)
  assert cosine_from_sums(float(r @ t), float(r.dot(r)), float(t.dot(t))) == \
      cosine(ref, test)
  assert sqnr_db_from_power(1.0, 0.0) == math.inf
  assert sqnr_db_from_power(0.0, 1.0) == -math.inf
  assert cosine_from_sums(0.0, 0.0, 0.0) == 1.0
  assert cosine_from_sums(0.0, 0.0, 2.0) == 0.0


def test_compare_module_reexports():
  from qlite.analysis import compare as compare_mod
  assert compare_mod.compare is qlite.compare
  assert compare_mod.Report is Report
  assert compare_mod.LAYER_METRICS is LAYER_METRICS
