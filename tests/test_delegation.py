"""qlite.inspect_tflite(...).delegation: which ops LiteRT's XNNPACK delegate
runs and which it leaves to the builtin kernels (read from the interpreter's
DELEGATE nodes), and the line `qlite inspect` prints."""

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlite
from qlite import cli

RULES = [qlite.QuantizationRule()]


class Logits(nn.Module):
  """Attention logits q @ k^T of two activations (an int8 BATCH_MATMUL);
  k >= 0 (a relu), so an asymmetric k would get zero point -128."""
  softmax: bool = False

  @nn.compact
  def __call__(self, x):
    q = nn.Dense(16)(x).reshape(1, 8, 2, 8)
    k = nn.relu(nn.Dense(16)(x)).reshape(1, 8, 2, 8)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    return jax.nn.softmax(s, axis=-1) if self.softmax else s


def _export(softmax: bool, float_model: bool = False) -> bytes:
  m = Logits(softmax)
  x = np.random.default_rng(0).normal(size=(1, 8, 12)).astype(np.float32)
  v = m.init(jax.random.key(0), x)
  if float_model:
    return qlite.export_float_tflite(m, x, variables=v)
  stats = qlite.calibrate(m, RULES, [x, 0.5 * x + 0.1], variables=v,
                          progress=False)
  return qlite.export_tflite(m, RULES, stats, x, variables=v)


@pytest.fixture(scope="module")
def softmax_blob():
  return _export(softmax=True)


def test_int8_product_of_two_activations_is_fully_delegated():
  info = qlite.inspect_tflite(_export(softmax=False))
  assert info.full_integer
  assert info.op_histogram["BATCH_MATMUL"] == 1
  d = info.delegation
  assert d.builtin_ops == [] and d.fully_delegated and d.error is None
  assert (d.num_ops, d.num_delegated, d.num_partitions) == (
      len(info.ops), len(info.ops), 1)
  # why XNNPACK takes it: the right-hand side is at zero point 0
  (bmm,) = [op for op in info.ops if op.name == "BATCH_MATMUL"]
  assert int(info.tensor(bmm.inputs[1]).zero_point[0]) == 0
  assert d.summary() == (f"XNNPACK: {len(info.ops)}/{len(info.ops)} ops "
                         f"delegated in 1 partition")
  assert info.delegation is d   # computed once


def test_int8_softmax_is_reported_on_the_builtin_kernels(softmax_blob):
  info = qlite.inspect_tflite(softmax_blob)
  d = info.delegation
  assert d.builtin_histogram == {"SOFTMAX": 1}
  (op,) = d.builtin_ops
  assert op is info.ops[op.index]   # the flatbuffer's op, with its tensors
  assert info.tensor(op.inputs[0]).dtype == "INT8"
  # the ops before and after the softmax: two partitions
  assert d.num_partitions == 2 and not d.fully_delegated
  n = len(info.ops)
  assert d.summary() == (f"XNNPACK: {n - 1}/{n} ops delegated in 2 "
                         f"partitions; builtin: SOFTMAX x1")
  (line,) = d.details()
  assert line.startswith(f"op {op.index} SOFTMAX: in INT8[1,2,8,8] zp ")
  assert "-> out INT8[1,2,8,8] zp -128 s 0.00391" in line


def test_float_model_is_fully_delegated():
  info = qlite.inspect_tflite(_export(softmax=True, float_model=True))
  d = info.delegation
  assert "SOFTMAX" in info.op_histogram and "BATCH_MATMUL" in info.op_histogram
  assert d.fully_delegated and d.num_partitions == 1
  assert d.num_delegated == d.num_ops == len(info.ops)


def test_cli_inspect_prints_the_delegation(softmax_blob, tmp_path, capsys):
  path = tmp_path / "m.tflite"
  path.write_bytes(softmax_blob)
  assert cli.main(["inspect", str(path)]) == 0
  out = capsys.readouterr().out
  n = len(qlite.inspect_tflite(softmax_blob).ops)
  assert (f"XNNPACK: {n - 1}/{n} ops delegated in 2 partitions; builtin: "
          f"SOFTMAX x1") in out.splitlines()
  assert "builtin op" not in out
  assert cli.main(["inspect", str(path), "--delegation"]) == 0
  lines = [ln for ln in capsys.readouterr().out.splitlines()
           if ln.startswith("  builtin op ")]
  assert len(lines) == 1 and " SOFTMAX: in INT8[1,2,8,8]" in lines[0]


def test_hand_built_info_has_no_delegation():
  info = qlite.TFLiteInfo(0, [], [], [], [], [])
  with pytest.raises(qlite.QliteError, match="no model bytes"):
    info.delegation


def test_bench_times_every_blob_in_each_round(softmax_blob):
  """bench/real_size.py's interleaved timing: every blob gets its runs,
  spread over the rounds; a blob slower than the budget gets min_runs,
  one per round."""
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "bench"))
  import real_size
  blobs = {"int8": softmax_blob,
           "float": _export(softmax=True, float_model=True)}
  out = real_size.interleaved_latency_ms(blobs, 1, runs=7, rounds=3,
                                         log=lambda s: None)
  assert [(v["runs"], len(v["rounds"])) for v in out.values()] == [(7, 3)] * 2
  for v in out.values():
    assert min(v["rounds"]) <= v["ms"] <= max(v["rounds"]) and v["ms"] > 0
  out = real_size.interleaved_latency_ms(blobs, 2, budget_s=0.0, min_runs=3,
                                         rounds=5, log=lambda s: None)
  assert [(v["runs"], len(v["rounds"])) for v in out.values()] == [(3, 3)] * 2
