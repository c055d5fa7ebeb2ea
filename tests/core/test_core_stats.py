"""Tests for qlite.core.stats.QuantStats: container, pytree, save / load."""

import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlite.core import QuantStats, aggregate, batch_stats
from qlite.core.stats import MissingRecordError
from qlite.errors import CalibrationError, QliteError


@pytest.fixture()
def stats():
  rng = np.random.default_rng(0)
  records = {}
  for name in ("Conv_0/conv_general_dilated:out", "Dense_0/dot_general:in0",
               "weird name/ with:colons.and.npy"):
    rec = None
    for _ in range(3):
      rec = aggregate(rec, batch_stats(jnp.asarray(rng.normal(size=64))))
    records[name] = rec
  return QuantStats(records, {"num_batches": 3, "method": "minmax",
                              "fingerprint": "abc123", "qlite": "0.1.0"})


def test_mapping_api(stats):
  assert len(stats) == 3
  assert "Dense_0/dot_general:in0" in stats and "nope" not in stats
  assert list(stats.keys())[0] == "Conv_0/conv_general_dilated:out"
  assert stats["Dense_0/dot_general:in0"]["num_batches"] == 3
  with pytest.raises(KeyError):
    stats["nope"]
  with pytest.raises(CalibrationError, match=r"'nope'.*known boundaries"):
    stats["nope"]
  assert issubclass(MissingRecordError, QliteError)
  assert repr(stats) == "QuantStats(3 records, 3 batches, method='minmax')"


def test_save_load_exact(stats, tmp_path):
  path = tmp_path / "stats.npz"
  stats.save(path)
  assert sorted(os.listdir(tmp_path)) == ["stats.npz"]  # no temp file left
  loaded = QuantStats.load(str(path))
  assert loaded == stats
  assert list(loaded.keys()) == list(stats.keys())
  assert loaded.meta == stats.meta
  for name in stats.keys():
    for k, v in stats[name].items():
      w = loaded[name][k]
      assert v.dtype == w.dtype and v.tobytes() == w.tobytes()


def test_save_without_npz_suffix_and_overwrite(stats, tmp_path):
  path = tmp_path / "calib.qstats"
  stats.save(path)
  QuantStats({}, {"x": 1}).save(path)
  assert QuantStats.load(path) == QuantStats({}, {"x": 1})
  assert not (tmp_path / "calib.qstats.npz").exists()


def test_equality_is_exact(stats):
  other = QuantStats(stats.records, dict(stats.meta))
  assert other == stats
  name = next(iter(stats.keys()))
  changed = {n: dict(r) for n, r in stats.items()}
  changed[name]["min"] = np.nextafter(changed[name]["min"], 0)
  assert QuantStats(changed, stats.meta) != stats
  assert QuantStats(stats.records, {**stats.meta, "method": "ema"}) != stats


def test_pytree_round_trip(stats):
  leaves, treedef = jax.tree_util.tree_flatten(stats)
  assert len(leaves) == 3 * 10
  assert jax.tree_util.tree_unflatten(treedef, leaves) == stats
  doubled = jax.tree_util.tree_map(lambda x: x * 2, stats)
  assert doubled[name := next(iter(stats.keys()))]["count"] == 2 * stats[name]["count"]


def test_save_missing_dir_names_directory(stats, tmp_path):
  missing = tmp_path / "no" / "such"
  with pytest.raises(QliteError, match=str(missing)):
    stats.save(missing / "s.npz")


def test_meta_must_be_json():
  with pytest.raises(QliteError, match="JSON"):
    QuantStats({}, {"bad": object()})


def test_load_missing_file(tmp_path):
  p = tmp_path / "absent.npz"
  with pytest.raises(CalibrationError, match="does not exist"):
    QuantStats.load(p)


@pytest.mark.parametrize("content", [b"", b"not a zip at all",
                                     b"PK\x03\x04garbage" * 10])
def test_load_corrupted(tmp_path, content):
  p = tmp_path / "bad.npz"
  p.write_bytes(content)
  with pytest.raises(CalibrationError, match=r"bad\.npz.*corrupted or not a \.npz"):
    QuantStats.load(p)


def test_load_truncated(stats, tmp_path):
  p = tmp_path / "s.npz"
  stats.save(p)
  data = p.read_bytes()
  p.write_bytes(data[: len(data) // 2])
  with pytest.raises(CalibrationError, match="s.npz"):
    QuantStats.load(p)


def test_load_wrong_format(tmp_path):
  p = tmp_path / "other.npz"
  np.savez(p, a=np.zeros(3))
  with pytest.raises(CalibrationError, match="not a qlite QuantStats file"):
    QuantStats.load(p)
  p2 = tmp_path / "single.npy"
  np.save(p2, np.zeros(3))
  with pytest.raises(CalibrationError, match="single .npy array"):
    QuantStats.load(p2)


def test_load_rejects_nan(tmp_path):
  rec = aggregate(None, batch_stats(jnp.array([1.0, jnp.nan])))
  p = tmp_path / "nan.npz"
  QuantStats({"Dense_1:out": rec}, {}).save(p)
  with pytest.raises(CalibrationError, match=r"nan\.npz.*'Dense_1:out'.*NaN/Inf"):
    QuantStats.load(p)


def test_load_incomplete(stats, tmp_path):
  p = tmp_path / "s.npz"
  stats.save(p)
  q = tmp_path / "cut.npz"
  with zipfile.ZipFile(p) as zin, zipfile.ZipFile(q, "w") as zout:
    for item in zin.infolist():
      if item.filename != "r0.0.npy":
        zout.writestr(item, zin.read(item.filename))
  with pytest.raises(CalibrationError, match="incomplete"):
    QuantStats.load(q)
