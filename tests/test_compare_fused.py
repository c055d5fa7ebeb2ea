"""compare: a value the converter fuses into a later op (``x - c`` into a SUB
with a fused RELU) has no LiteRT tensor of its own. It is reported unmatched
("fused"), not compared against the fused op's output (a false 0 dB)."""
import flax.linen as nn
import jax
import numpy as np

import qlite


class _GateShift(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8)(nn.relu(nn.Dense(64, name="gate")(x) - 2.5))


def test_fused_sub_is_unmatched_not_a_false_alarm():
  m = _GateShift()
  x = np.random.RandomState(0).randn(16, 32).astype(np.float32) * 2
  v = m.init(jax.random.key(0), x)
  batches = [x[i:i + 4] for i in range(0, 16, 4)]
  rules = [qlite.QuantizationRule(module_path=".*", weight_qtype="int8",
                                  act_qtype="int8")]
  st = qlite.calibrate(m, rules, batches, variables=v, progress=False)
  tfl = qlite.export_tflite(m, rules, st, (x[:4],), variables=v)
  r = qlite.compare(m, rules, st, tfl, batches, variables=v, progress=False)
  sub = next(row for row in r.layers if row.op == "sub")
  mx = next(row for row in r.layers if row.op == "max")
  assert not sub.matched and sub.match.startswith("fused")
  assert "`max`" in sub.match
  assert mx.matched and mx.max_lsb <= 1.01
  # every matched layer is faithful: no false alarm remains
  assert all(row.max_lsb <= 2.0 for row in r.layers if row.matched)
  assert r.worst(1)[0].op != "sub"
