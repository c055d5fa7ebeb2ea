"""Tests for qlite.core.qtypes."""

import statistics

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qlite.core import qtypes
from qlite.core.qtypes import NF4_LEVELS, QType, get_qtype
from qlite.errors import QliteError, QTypeError

# The 16 NF4 levels as published with QLoRA (bitsandbytes), to 1e-6.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0]


@pytest.mark.parametrize("name,qmin,qmax,storage", [
    ("int8", -128, 127, np.int8),
    ("int4", -8, 7, ml_dtypes.int4),
    ("int2", -2, 1, np.int8),
    ("int3", -4, 3, np.int8),
    ("int7", -64, 63, np.int8),
    ("int16", -32768, 32767, np.int16),
    ("uint8", 0, 255, np.uint8),
])
def test_int_ranges_and_storage(name, qmin, qmax, storage):
  qt = get_qtype(name)
  assert qt.kind == "int"
  assert (qt.qmin, qt.qmax) == (qmin, qmax)
  assert np.dtype(qt.storage_dtype) == np.dtype(storage)


def test_int4_storage_is_jnp_int4():
  assert np.dtype(get_qtype("int4").storage_dtype) == np.dtype(jnp.int4)
  assert get_qtype("int4").storage_itemsize_bits == 4
  assert get_qtype("int3").storage_itemsize_bits == 8


def test_narrow_qmin():
  assert get_qtype("int8").narrow_qmin(True) == -127
  assert get_qtype("int8").narrow_qmin(False) == -128
  assert get_qtype("uint8").narrow_qmin(True) == 1
  assert get_qtype("fp8_e4m3").narrow_qmin(True) == -448.0


@pytest.mark.parametrize("alias,canonical,max_finite", [
    ("fp8_e4m3", "fp8_e4m3", 448.0),
    ("float8_e4m3fn", "fp8_e4m3", 448.0),
    ("E4M3", "fp8_e4m3", 448.0),
    ("fp8_e5m2", "fp8_e5m2", 57344.0),
    ("float8_e5m2", "fp8_e5m2", 57344.0),
    ("e5m2", "fp8_e5m2", 57344.0),
])
def test_float_aliases(alias, canonical, max_finite):
  qt = get_qtype(alias)
  assert qt.name == canonical and qt.kind == "float"
  assert (qt.qmin, qt.qmax) == (-max_finite, max_finite)


def test_nf4_levels_monotonic_16_and_published():
  assert NF4_LEVELS.shape == (16,) and NF4_LEVELS.dtype == np.float32
  assert np.all(np.diff(NF4_LEVELS) > 0)
  assert NF4_LEVELS[0] == -1.0 and NF4_LEVELS[-1] == 1.0 and NF4_LEVELS[7] == 0.0
  np.testing.assert_allclose(NF4_LEVELS, PUBLISHED_NF4, atol=1e-6)
  qt = get_qtype("nf4")
  assert (qt.kind, qt.qmin, qt.qmax) == ("nf4", -1.0, 1.0)
  assert np.dtype(qt.storage_dtype) == np.uint8


def test_nf4_positive_levels_are_normal_quantiles():
  q = statistics.NormalDist().inv_cdf(0.9677083)
  expected = statistics.NormalDist().inv_cdf(np.linspace(0.9677083, 0.5, 9)[1]) / q
  assert NF4_LEVELS[-2] == pytest.approx(expected, abs=1e-6)


def test_get_qtype_passthrough_and_hashable():
  qt = get_qtype("int8")
  assert get_qtype(qt) is qt
  assert isinstance(qt, QType)
  assert hash(qt) == hash(get_qtype("INT8"))
  assert {qt: 1}[get_qtype("int8")] == 1


def test_unknown_name_lists_valid():
  with pytest.raises(QTypeError) as e:
    get_qtype("int9")
  msg = str(e.value)
  assert "'int9'" in msg and "int8" in msg and "fp8_e4m3" in msg and "nf4" in msg
  assert isinstance(e.value, QliteError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("bad", [8, None, np.int8, 1.5])
def test_non_string_raises(bad):
  with pytest.raises(QTypeError, match="qtype must be"):
    get_qtype(bad)


def test_names_cover_request():
  names = qtypes.qtype_names()
  for n in ["int2", "int3", "int4", "int5", "int6", "int7", "int8", "int16",
            "uint8", "fp8_e4m3", "fp8_e5m2", "nf4", "e4m3", "e5m2"]:
    assert n in names
