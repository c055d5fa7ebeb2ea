"""A seeded model fuzzer: random Flax Linen models built from the zoo's op
vocabulary (convs, depthwise, BatchNorm, activations, pools, residual adds,
concats, squeeze-excite gates, resizes, dense / LayerNorm / attention on
sequences). Every op drawn is in qlite's supported vocabulary, so each model
must export full-integer with LiteRT SQNR vs float above ``SQNR_FLOOR_DB``
and LiteRT faithful to the fake-quant model. A named ``qlite.QliteError``
is accepted only for a seed listed in ``EXPECTED_NAMED_ERRORS`` (with the
error class and the reason); anything else -- crash, silent float ops, a
named error on any other seed -- fails the run.

    python tests/fuzz_models.py 200     # `make fuzz`
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import traceback
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import qlite
from qlite.metrics import sqnr_db

# Two checks per converted model:
# * conversion is faithful: LiteRT vs qlite's fake-quant JAX model (same
#   scales) within MAX_LSB of the output scale;
# * quantization is sane: LiteRT vs float SQNR >= SQNR_FLOOR_DB. int8 noise is
#   ~40-45 dB per tensor and the median fuzz model reaches ~39 dB, but random
#   programs can put a LayerNorm after a softmax gate, where rows whose spread
#   is far below the per-tensor int8 range lose most of their precision
#   (measured down to 12.7 dB with LiteRT matching fake-quant to 1 LSB: an
#   int8 limit, not a conversion bug; `qlite compare` shows the variance /
#   rsqrt rows as the worst). The floor separates that from broken
#   conversions, which land near 0 dB.
SQNR_FLOOR_DB = 10.0
# Faithful conversion: LiteRT within MAX_LSB of the fake-quant model, or at
# least as close to float as the fake-quant model is (within FAITHFUL_DB).
# int8 AVERAGE_POOL_2D / MEAN round differently from the float fake-quant
# model, so outputs whose range is tiny next to their inputs' (a mean of
# values that cancel) differ by 5-14 LSB while LiteRT is as accurate as the
# fake-quant model. A broken conversion (e.g. an int32 bias overflow, found
# by seed 93 and fixed) is 30 dB worse than fake-quant.
MAX_LSB = 4.0
FAITHFUL_DB = 3.0

# seed -> (QliteError subclass name, why that model is outside what qlite
# supports). Empty: seeds 0-199 all export full-integer (last `make fuzz`).
EXPECTED_NAMED_ERRORS: dict[int, tuple[str, str]] = {}

IMAGE_OPS = ("conv", "depthwise", "bn", "act", "pool", "residual", "concat",
             "se", "resize", "conv_stride")
SEQ_OPS = ("dense", "layernorm", "attention", "act", "residual", "mix",
           "softmax_gate")
ACTS = ("relu", "relu6", "gelu", "gelu_erf", "sigmoid", "swish", "hard_swish",
        "tanh", "leaky_relu")


def _act(name, x):
  return {
      "relu": nn.relu, "relu6": nn.relu6, "sigmoid": nn.sigmoid,
      "swish": nn.swish, "hard_swish": nn.hard_swish, "tanh": jnp.tanh,
      "leaky_relu": nn.leaky_relu,
      "gelu": lambda v: nn.gelu(v, approximate=True),
      "gelu_erf": lambda v: nn.gelu(v, approximate=False),
  }[name](x)


class FuzzImage(nn.Module):
  program: tuple

  @nn.compact
  def __call__(self, x):
    saved = x
    for op, arg in self.program:
      c = x.shape[-1]
      if op == "conv":
        x = nn.Conv(arg, (3, 3))(x)
      elif op == "conv_stride" and x.shape[1] >= 4:
        x = nn.Conv(arg, (3, 3), strides=(2, 2))(x)
      elif op == "depthwise":
        x = nn.Conv(c, (3, 3), feature_group_count=c)(x)
      elif op == "bn":
        x = nn.BatchNorm(use_running_average=True)(x)
      elif op == "act":
        x = _act(arg, x)
      elif op == "pool" and x.shape[1] >= 4:
        pool = nn.max_pool if arg == "max" else nn.avg_pool
        x = pool(x, (2, 2), (2, 2))
      elif op == "residual" and saved.shape == x.shape:
        x = x + saved
      elif op == "concat" and saved.shape[:-1] == x.shape[:-1]:
        x = jnp.concatenate([x, saved], axis=-1)
      elif op == "se":
        g = jnp.mean(x, axis=(1, 2))
        g = nn.relu(nn.Dense(max(c // 2, 1))(g))
        g = nn.sigmoid(nn.Dense(c)(g))
        x = x * g[:, None, None, :]
      elif op == "resize" and x.shape[1] <= 8:
        n, h, w, _ = x.shape
        x = jax.image.resize(x, (n, 2 * h, 2 * w, c), arg)
      if op in ("conv", "conv_stride", "residual", "concat"):
        saved = x
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(5)(x)


class FuzzSeq(nn.Module):
  program: tuple

  @nn.compact
  def __call__(self, x):
    saved = x
    for op, arg in self.program:
      d = x.shape[-1]
      if op == "dense":
        x = nn.Dense(arg)(x)
      elif op == "layernorm":
        x = nn.LayerNorm()(x)
      elif op == "attention":
        x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
      elif op == "act":
        x = _act(arg, x)
      elif op == "residual" and saved.shape == x.shape:
        x = x + saved
      elif op == "mix":
        x = jnp.swapaxes(nn.Dense(x.shape[1])(jnp.swapaxes(x, 1, 2)), 1, 2)
      elif op == "softmax_gate":
        x = x * jax.nn.softmax(nn.Dense(d)(x))
      if op in ("dense", "residual", "attention"):
        saved = x
    return nn.Dense(5)(jnp.mean(x, axis=1))


@dataclasses.dataclass
class FuzzCase:
  seed: int
  model: nn.Module
  variables: dict
  batches: list
  description: str


def generate(seed: int) -> FuzzCase:
  """Returns the random model, variables and calibration batches of ``seed``."""
  rng = np.random.default_rng(seed)
  depth = int(rng.integers(2, 9))
  if rng.random() < 0.6:
    vocab, cls = IMAGE_OPS, FuzzImage
    hw = int(rng.choice([4, 8, 16]))
    shape = (int(rng.integers(1, 3)), hw, hw, int(rng.choice([1, 3, 4])))
  else:
    vocab, cls = SEQ_OPS, FuzzSeq
    shape = (int(rng.integers(1, 3)), int(rng.choice([4, 8])), 8)
  program = []
  for _ in range(depth):
    op = str(rng.choice(vocab))
    if op in ("conv", "conv_stride", "dense"):
      arg = int(rng.choice([4, 8, 16]))
    elif op == "act":
      arg = str(rng.choice(ACTS))
    elif op == "pool":
      arg = str(rng.choice(["max", "avg"]))
    elif op == "resize":
      arg = str(rng.choice(["nearest", "bilinear"]))
    else:
      arg = None
    program.append((op, arg))
  model = cls(tuple(program))
  lo = float(rng.choice([0.0, -1.0]))
  hi = float(rng.choice([1.0, 4.0]))
  batches = [rng.uniform(lo, hi, size=shape).astype(np.float32)
             for _ in range(6)]
  variables = model.init(jax.random.key(seed), batches[0])
  if "batch_stats" in variables:   # non-trivial BatchNorm statistics
    variables = jax.tree.map(lambda a: jnp.asarray(
        rng.uniform(0.5, 1.5, a.shape), a.dtype), variables)
  return FuzzCase(seed, model, variables, batches,
                  f"{cls.__name__}{shape} {program}")


@dataclasses.dataclass
class FuzzResult:
  seed: int
  outcome: str   # "full_integer" | "named_error" | "low_sqnr" | "crash"
  # ("crash" also covers silent float ops and LiteRT != fake-quant)
  detail: str
  sqnr: float = float("nan")


def run_seed(seed: int) -> FuzzResult:
  """Builds, calibrates, exports and runs one random model."""
  try:
    case = generate(seed)
  except Exception as e:  # the generator itself must not be the failure
    return FuzzResult(seed, "crash", f"generator: {e!r}")
  rules = [qlite.QuantizationRule()]
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      stats = qlite.calibrate(case.model, rules, case.batches,
                              variables=case.variables, progress=False)
      x1 = case.batches[0]
      blob = qlite.export_tflite(case.model, rules, stats, x1,
                                 variables=case.variables)
  except qlite.QliteError as e:
    return FuzzResult(seed, "named_error",
                      f"{type(e).__name__}: {str(e)[:300]} | {case.description}")
  except Exception:
    return FuzzResult(seed, "crash",
                      traceback.format_exc()[-1500:] + case.description)
  info = qlite.inspect_tflite(blob)
  if not info.full_integer:   # strict export must never let this through
    return FuzzResult(seed, "crash", "silent float ops: " +
                      ", ".join(op.name for op in info.float_ops))
  runner = qlite.TFLiteRunner(blob)
  fake = qlite.quantize_model(
      case.model, qlite.annotate.ConversionProvider(rules, stats),
      variables=case.variables)
  refs, outs, fakes = [], [], []
  for b in case.batches[:3]:
    refs.append(np.asarray(case.model.apply(case.variables, b)))
    fakes.append(np.asarray(fake.apply(case.variables, b)))
    outs.append(runner.run(b)[0])
  s = sqnr_db(np.stack(refs), np.stack(outs))
  out_op = info.ops[-1]
  lsb = float(info.tensor(out_op.inputs[0]).scale[0]) \
      if out_op.name == "DEQUANTIZE" else float("nan")
  diff = float(np.max(np.abs(np.stack(outs) - np.stack(fakes)))) / lsb
  s_fake = sqnr_db(np.stack(refs), np.stack(fakes))
  if not (diff <= MAX_LSB or s >= s_fake - FAITHFUL_DB):
    return FuzzResult(seed, "crash", f"LiteRT differs from fake-quant by "
                      f"{diff:.1f} LSB | {case.description}", s)
  if not s >= SQNR_FLOOR_DB:
    return FuzzResult(seed, "low_sqnr", f"{s:.1f} dB | {case.description}", s)
  return FuzzResult(seed, "full_integer", case.description, s)


def unexpected(r: FuzzResult) -> str | None:
  """Why ``r`` fails the fuzzer, or None: a seed in ``EXPECTED_NAMED_ERRORS``
  must raise that error class (and the message must say what to change),
  every other seed must be full-integer."""
  if r.seed in EXPECTED_NAMED_ERRORS:
    cls, why = EXPECTED_NAMED_ERRORS[r.seed]
    if r.outcome != "named_error" or not r.detail.startswith(cls + ":"):
      return f"expected {cls} ({why}), got {r.outcome}: {r.detail}"
    if "`" not in r.detail and "rule" not in r.detail:
      return f"{cls} does not say what to change: {r.detail}"
    return None
  if r.outcome != "full_integer":
    return f"{r.outcome}: {r.detail}"
  return None


def main(n: int = 200, start: int = 0) -> collections.Counter:
  """Runs seeds ``start .. start+n-1``; prints counts and every non-success.
  ``counts["unexpected"]`` counts the seeds :func:`unexpected` rejects."""
  from tqdm import tqdm
  results = [run_seed(s) for s in tqdm(range(start, start + n), desc="fuzz")]
  counts = collections.Counter(r.outcome for r in results)
  for r in results:
    if r.outcome != "full_integer":
      print(f"seed {r.seed}: {r.outcome}: {r.detail}")
  bad = [r for r in results if unexpected(r)]
  for r in bad:
    print(f"UNEXPECTED seed {r.seed}: {unexpected(r)}")
  if bad:
    counts["unexpected"] = len(bad)
  sq = [r.sqnr for r in results if r.outcome == "full_integer"]
  print(f"\n{n} seeds: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
  if sq:
    print(f"SQNR of full-integer models: min {min(sq):.1f} dB, median "
          f"{float(np.median(sq)):.1f} dB")
  return counts


if __name__ == "__main__":
  counts = main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
  sys.exit(1 if counts.get("unexpected") else 0)
