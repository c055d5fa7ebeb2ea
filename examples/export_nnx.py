"""Export your own Flax NNX model (with BatchNorm and Dropout) to a
full-integer LiteRT .tflite.

    python examples/export_nnx.py [--out model.tflite]

An NNX CNN with BatchNorm and Dropout is trained for a few seconds on
scikit-learn's digits. A model left in training mode (BatchNorm on batch
statistics, Dropout active) is refused with an error naming the module;
after ``model.eval()`` it calibrates and exports with int8 inputs and
outputs (BatchNorm folded into the convolution, Dropout gone). Prints the
error, the ops, the I/O quantization, SQNR against the float model and the
accuracies.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np
import optax
from flax import nnx

import qlite
from qlite.zoo.digits import load_digits


class MyNet(nnx.Module):
  """conv-BatchNorm-relu, max-pool, flatten, Dropout, dense (NNX)."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.head = nnx.Linear(4 * 4 * 16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = nnx.max_pool(x, (2, 2), (2, 2))
    x = self.drop(x.reshape(x.shape[0], -1))
    return self.head(x)


def train(model: MyNet, data, steps: int = 200, seed: int = 0):
  model.train()                      # BatchNorm batch stats, Dropout on
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    def loss(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = nnx.grad(loss)(model)
    opt.update(model, grads)

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(data.x_train), 64)
    step(model, opt, data.x_train[idx], data.y_train[idx])


def main(out: str | None = None) -> dict:
  data = load_digits(seed=0)
  model = MyNet(nnx.Rngs(0))
  train(model, data)
  rules = [qlite.QuantizationRule(module_path=r".*", weight_qtype="int8",
                                  act_qtype="int8")]
  batches = data.batches(64, 8)

  # Still in training mode: qlite refuses, naming the module and the fix.
  try:
    qlite.calibrate(model, rules, batches, progress=False)
    refused = None
  except qlite.QliteError as e:
    refused = str(e)
    print(f"in training mode: {type(e).__name__}: {refused}\n")

  model.eval()                       # running averages, Dropout off
  stats = qlite.calibrate(model, rules, batches, progress=False)  # NNX: no variables
  out = out or os.path.join(tempfile.mkdtemp(), "my_nnx_int8.tflite")
  blob = qlite.export_tflite(model, rules, stats, data.x_test[:1], path=out,
                             io_dtype="int8")

  info = qlite.inspect_tflite(blob)
  print("inspect_tflite:")
  print("  " + info.summary().replace("\n", "\n  "))
  t_in, t_out = info.tensor(info.inputs[0]), info.tensor(info.outputs[0])
  print(f"  input  {t_in.dtype} scale {float(t_in.scale[0]):.6g} zero point "
        f"{int(t_in.zero_point[0])}; output {t_out.dtype} scale "
        f"{float(t_out.scale[0]):.6g} zero point {int(t_out.zero_point[0])}")
  print(f"  BatchNorm folded into the conv (no MUL / ADD op left): "
        f"{not {'MUL', 'ADD'} & set(info.op_histogram)}")

  # TFLiteRunner quantizes a float input with the file's scale itself.
  runner = qlite.TFLiteRunner(blob)
  x, y = data.x_test, data.y_test
  lite = np.concatenate([runner.run(x[i:i + 1])[0] for i in range(len(x))])
  ref = np.asarray(model(x))         # eval mode: deterministic
  sqnr = qlite.metrics.sqnr_db(ref, lite)
  acc_f = float(np.mean(ref.argmax(-1) == y) * 100)
  acc_q = float(np.mean(lite.argmax(-1) == y) * 100)
  print(f"\n{len(x)} held-out digits:")
  print(f"  float NNX (eval) accuracy  {acc_f:6.2f} %")
  print(f"  LiteRT int8 accuracy       {acc_q:6.2f} %")
  print(f"  SQNR LiteRT vs float       {sqnr:6.1f} dB")
  print(f"  full integer               {info.full_integer}")
  print(f"  file                       {out} ({len(blob):,} bytes)")
  return {"sqnr_db": sqnr, "acc_float": acc_f, "acc_int8": acc_q,
          "refused": refused, "full_integer": info.full_integer}


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", help="where to write the .tflite (default: a "
                 "temporary directory)")
  main(p.parse_args().out)
