"""The fake-quant JAX model computes what the exported .tflite computes, where
LiteRT fuses an activation into an elementwise kernel.

litert-converter fuses a relu reading an ADD / SUB / MUL (and nothing else)
into that kernel (``fused_activation_function = RELU``): the kernel
requantizes its result straight to the relu's output scale, and the op's own
boundary never exists in the .tflite. Rounding there (at the op's own,
coarser scale: its range spans both signs, the relu's only [0, max]) put
the fake-quant model below LiteRT: on zoo ``tcn/linen`` (held-out rows)
fake-quant 40.2 dB vs LiteRT 43.6 dB against float, 2 LSB apart at the
output; on ResNet-50 at 64x64 (every block ends ``relu(x + shortcut)``)
32.7 vs 34.1 dB. The plan now marks such a boundary ``rounding="none"``
(and, for ``min(max(x, 0), 6)``, the max's boundary too: the MINIMUM reads
the fused op's output at its own scale).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import qlite
from qlite.core import numerics
from qlite.zoo import base, registry

warnings.filterwarnings("ignore")

RULES = [qlite.QuantizationRule()]


class _TwoDense(nn.Module):
  """Two Dense layers combined by ``kind`` before a relu."""
  kind: str

  @nn.compact
  def __call__(self, x):
    a = nn.Dense(16, name="a")(x)
    b = nn.Dense(16, name="b")(x)
    if self.kind == "add":
      return nn.relu(a + b)
    if self.kind == "sub":
      return nn.relu(a - b)
    if self.kind == "mul":
      return nn.relu(a * b)
    if self.kind == "add_const":
      return nn.relu(a + 0.3)
    if self.kind == "add_relu6":                # min(max(a + b, 0), 6)
      return nn.relu6(a + b)
    if self.kind == "add_two_readers":       # the ADD's output read twice
      s = a + b
      return nn.relu(s) + s
    raise ValueError(self.kind)


def _run(kind):
  rng = np.random.default_rng(0)
  batches = [rng.standard_normal((4, 8)).astype(np.float32) * 3
             for _ in range(4)]
  held = rng.standard_normal((16, 8)).astype(np.float32) * 3
  model = _TwoDense(kind)
  variables = model.init(jax.random.key(0), batches[0])
  stats = qlite.calibrate(model, RULES, batches, variables=variables,
                          progress=False)
  blob = qlite.export_tflite(model, RULES, stats, batches[0][:1],
                             variables=variables)
  rep = qlite.compare(model, RULES, stats, blob,
                      [held[i:i + 1] for i in range(len(held))],
                      variables=variables, progress=False)
  qm = qlite.quantize_model(
      model, qlite.annotate.ConversionProvider(RULES, stats),
      variables=variables)
  _, plan = qm.traced((batches[0][:1],))
  return blob, rep, plan


def _rounding(plan, op):
  return [b.rounding for b in plan.boundaries.values() if b.op == op]


@pytest.mark.parametrize("kind,op,litert_op", [
    ("add", "add", "ADD"), ("sub", "sub", "SUB"), ("mul", "mul", "MUL"),
    ("add_const", "add", "ADD")])
def test_relu_fused_into_elementwise_op_matches_litert(kind, op, litert_op):
  # before: 1-2 LSB of the output scale apart (add 2.0, sub / mul /
  # add_const 1.0), LiteRT vs fake-quant SQNR 36-43 dB
  blob, rep, plan = _run(kind)
  ops = [o.name for o in qlite.inspect_tflite(blob).ops]
  assert litert_op in ops and "RELU" not in ops       # the relu is fused
  assert _rounding(plan, op) == ["none"]
  out = rep.outputs[0]
  assert out.max_lsb == 0.0
  assert out.metrics["litert_vs_fakequant"].sqnr_db == float("inf")


def test_relu6_after_add_matches_litert():
  # the RELU fuses into the ADD, the MINIMUM stays and reads the ADD's
  # output at its own scale (6 / 255): neither the add's nor the max's
  # boundary exists in the .tflite. Before: 3 LSB apart (1 LSB with only
  # the add's rounding dropped).
  blob, rep, plan = _run("add_relu6")
  ops = [o.name for o in qlite.inspect_tflite(blob).ops]
  assert ops.count("ADD") == 1 and "MINIMUM" in ops and "RELU" not in ops
  assert _rounding(plan, "add") == ["none"]
  assert _rounding(plan, "max") == ["none"]
  assert _rounding(plan, "min") == ["half_even"]
  assert rep.outputs[0].max_lsb == 0.0


def test_elementwise_output_read_twice_keeps_its_rounding():
  # the relu cannot fuse (RELU is its own op): the ADD's value exists in the
  # .tflite at its own scale, and the fake-quant model rounds it there
  blob, rep, plan = _run("add_two_readers")
  assert "RELU" in [o.name for o in qlite.inspect_tflite(blob).ops]
  assert _rounding(plan, "add")[0] == "half_even"
  assert rep.outputs[0].max_lsb == 0.0


def test_rounding_none_passes_values_unquantized():
  x = np.array([-1.3, 0.01, 0.26, 7.0], np.float32)
  np.testing.assert_array_equal(
      numerics.fake_quant(x, 0.1, 0, "int8", rounding="none"), x)
  np.testing.assert_array_equal(
      np.asarray(numerics.fake_quant(jnp.asarray(x), 0.1, 0, "int8",
                                     rounding="none")), x)
  np.testing.assert_allclose(
      numerics.fake_quant(x, 0.1, 0, "int8"), [-1.3, 0.0, 0.3, 7.0],
      atol=1e-6)


def test_tcn_fake_quant_matches_litert_on_held_out_rows():
  # zoo tcn/linen: 1-D dilated convs, whose bias ADD takes the relu (a 1-D
  # conv is reshaped to 2-D, so its bias does not fuse into CONV_2D).
  # Before: fake-quant 40.2 dB, LiteRT 43.6 dB vs float, 2 LSB apart.
  zm = registry.get("tcn/linen")
  first = np.asarray(zm.batches[0])
  held = np.concatenate(base.normal_batches(first.shape[1:], seed=12345,
                                            num=4, batch_size=4))
  stats = qlite.calibrate(zm.model, RULES, zm.batches, variables=zm.variables,
                          progress=False)
  blob = qlite.export_tflite(zm.model, RULES, stats, (first[:1],),
                             variables=zm.variables)
  rep = qlite.compare(zm.model, RULES, stats, blob,
                      [held[i:i + 1] for i in range(len(held))],
                      variables=zm.variables, progress=False)
  out = rep.outputs[0]
  assert out.max_lsb == 0.0
  fq = out.metrics["fakequant_vs_float"].sqnr_db
  lite = out.metrics["litert_vs_float"].sqnr_db
  assert abs(fq - lite) < 0.01 and lite > 43.0
  # every matched boundary agrees bit for bit
  assert all(r.sqnr("litert_vs_fakequant") == float("inf")
             for r in rep.layers if r.matched)
