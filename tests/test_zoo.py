"""Every zoo model, Linen and NNX, converts full-integer with LiteRT SQNR
vs the float JAX model >= 25 dB (measured figures: `qlite zoo`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlite
from qlite.zoo import registry, report

# Minimum LiteRT-vs-float SQNR per family (dB). All at the 25 dB
# floor; measured values are 27-43 dB (see README's zoo table).
MIN_SQNR = {family: 25.0 for family in registry.FAMILIES}


@pytest.mark.parametrize("name", registry.names())
def test_zoo_model_is_full_integer(name):
  row = report.evaluate_model(registry.get(name))
  assert not row.error, row.error
  assert row.full_integer, "\n".join(row.float_ops)
  assert row.sqnr_db >= MIN_SQNR[name.split("/")[0]], row.sqnr_db
  assert row.ops.get("QUANTIZE", 0) <= 2 and row.ops.get("DEQUANTIZE", 0) == 1


class _Sine(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.sin(nn.Dense(8, name="proj")(x))


def test_uncoverable_op_is_named_in_strict_mode():
  m = _Sine()
  x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8)
  v = m.init(jax.random.key(0), x)
  rules = [qlite.QuantizationRule()]
  stats = qlite.calibrate(m, rules, [x], variables=v, progress=False)
  with pytest.raises(qlite.UnsupportedOpError) as e:
    qlite.export_tflite(m, rules, stats, x, variables=v)
  msg = str(e.value)
  assert "SIN" in msg and "`sin`" in msg and "strict=False" in msg
  # strict=False converts, warns and lists the float island.
  with pytest.warns(UserWarning, match="SIN"):
    blob = qlite.export_tflite(m, rules, stats, x, variables=v, strict=False)
  info = qlite.inspect_tflite(blob)
  assert not info.full_integer
  assert "SIN" in [op.name for op in info.float_ops]
  assert info.op_histogram["FULLY_CONNECTED"] == 1


def test_unknown_zoo_name_lists_valid_names():
  with pytest.raises(qlite.QliteError, match="mobilenet_v2/linen"):
    registry.get("nope")
