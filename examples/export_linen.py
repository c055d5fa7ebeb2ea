"""Export your own Flax Linen model to a full-integer LiteRT .tflite.

    python examples/export_linen.py [--out model.tflite]

A small Linen CNN (written here, not from qlite) is trained for a few
seconds on scikit-learn's digits, calibrated, exported with int8 inputs and
outputs, inspected, and run with the LiteRT interpreter the way an app on a
phone would feed it: the input quantized with the scale and zero point read
from the file. Prints the ops, the I/O quantization, SQNR against the float
model and the test accuracy of both.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np
import optax
from flax import linen as nn

import qlite
from qlite.zoo.digits import load_digits


class MyCNN(nn.Module):
  """A Linen CNN: conv-relu, avg-pool, conv-gelu, flatten, dense."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.gelu(nn.Conv(16, (3, 3), name="body")(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, name="head")(x)


def train(model, data, steps: int = 200, seed: int = 0):
  variables = model.init(jax.random.key(seed), data.x_train[:1])
  tx = optax.adam(3e-3)
  opt = tx.init(variables)

  @jax.jit
  def step(v, opt, x, y):
    def loss(v):
      logits = model.apply(v, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    upd, opt = tx.update(jax.grad(loss)(v), opt, v)
    return optax.apply_updates(v, upd), opt

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(data.x_train), 64)
    variables, opt = step(variables, opt, data.x_train[idx],
                          data.y_train[idx])
  return variables


def main(out: str | None = None) -> dict:
  data = load_digits(seed=0)
  model = MyCNN()
  variables = train(model, data)

  # 1. Rules: int8 weights (per channel) and int8 activations everywhere.
  rules = [qlite.QuantizationRule(module_path=r".*", weight_qtype="int8",
                                  act_qtype="int8")]
  # 2. Calibrate on a few training batches (activation ranges per boundary).
  stats = qlite.calibrate(model, rules, data.batches(64, 8),
                          variables=variables, progress=False)
  # 3. Export: batch-1 example input, int8 model inputs and outputs.
  out = out or os.path.join(tempfile.mkdtemp(), "my_cnn_int8.tflite")
  blob = qlite.export_tflite(model, rules, stats, data.x_test[:1],
                             variables=variables, path=out, io_dtype="int8")

  # 4. Inspect the file.
  info = qlite.inspect_tflite(blob)
  print("inspect_tflite:")
  print("  " + info.summary().replace("\n", "\n  "))
  t_in, t_out = info.tensor(info.inputs[0]), info.tensor(info.outputs[0])
  in_scale, in_zp = float(t_in.scale[0]), int(t_in.zero_point[0])
  print(f"  input  {t_in.dtype} {t_in.shape} scale {in_scale:.6g} "
        f"zero point {in_zp}")
  print(f"  output {t_out.dtype} {t_out.shape} scale "
        f"{float(t_out.scale[0]):.6g} zero point {int(t_out.zero_point[0])}")
  weights = [t for t in info.tensors if t.is_constant and t.per_channel
             and t.dtype == "INT8"]
  print(f"  {len(weights)} weight tensors quantized per channel: "
        + ", ".join(f"{t.dtype}{list(t.shape)}" for t in weights))

  # 5. Run it as an app would: quantize the input with the file's scale.
  runner = qlite.TFLiteRunner(blob)
  x, y = data.x_test, data.y_test
  lite = []
  for i in range(len(x)):
    q = np.clip(np.round(x[i:i + 1] / in_scale) + in_zp, -128, 127)
    lite.append(runner.run(q.astype(np.int8))[0])  # int8 out -> dequantized
  lite = np.concatenate(lite)
  ref = np.asarray(model.apply(variables, x))
  sqnr = qlite.metrics.sqnr_db(ref, lite)
  acc_f = float(np.mean(ref.argmax(-1) == y) * 100)
  acc_q = float(np.mean(lite.argmax(-1) == y) * 100)
  print(f"\n{len(x)} held-out digits:")
  print(f"  float JAX accuracy     {acc_f:6.2f} %")
  print(f"  LiteRT int8 accuracy   {acc_q:6.2f} %")
  print(f"  SQNR LiteRT vs float   {sqnr:6.1f} dB")
  print(f"  full integer           {info.full_integer}")
  print(f"  file                   {out} ({len(blob):,} bytes)")
  return {"sqnr_db": sqnr, "acc_float": acc_f, "acc_int8": acc_q,
          "full_integer": info.full_integer}


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", help="where to write the .tflite (default: a "
                 "temporary directory)")
  main(p.parse_args().out)
