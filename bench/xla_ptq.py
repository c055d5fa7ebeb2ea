"""XLA PTQ benchmark: an MLP (4 x 2048) and a transformer block, batch 1 and
64, f32 / bf16 / w8 weight-only / w8a8 DRQ / w8a8 SRQ / w4 weight-only side
by side in one run (interleaved rounds, median latency), parameter bytes,
SQNR vs f32, and the micro-measurements behind each compute path choice.

    python bench/xla_ptq.py [--reps N]

Prints a markdown table and writes it to bench/RESULTS_xla.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

import qlite
from qlite import xla
from qlite.kernels import cpu as cpu_kernels
from qlite.metrics import sqnr_db


class MLP(nn.Module):
  width: int = 2048
  depth: int = 4

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = nn.Dense(self.width)(x)
      if i < self.depth - 1:
        x = nn.relu(x)
    return x


class Block(nn.Module):
  """Pre-LN transformer block: einsum attention + GELU MLP."""
  d: int = 768
  heads: int = 12
  mlp: int = 3072

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    hd = self.d // self.heads
    y = nn.LayerNorm()(x)
    q, k, v = (nn.Dense(self.d, name=n)(y).reshape(b, t, self.heads, hd)
               for n in ("query", "key", "value"))
    a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd))
    y = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, self.d)
    x = x + nn.Dense(self.d, name="out")(y)
    y = nn.gelu(nn.Dense(self.mlp)(nn.LayerNorm()(x)))
    return x + nn.Dense(self.d)(y)


VARIANTS = [
    ("f32", None, "float32 XLA dot"),
    ("bf16", None, "params + input cast to bf16 (bf16 x bf16 -> bf16 dot)"),
    ("w8 weight-only", dict(weight_qtype="int8", act_qtype=None),
     "per-row int16 act (bits kept exact for int32) x [N,K] int8 weight in "
     "the qlite CPU kernel (jax.ffi, VNNI vpdpwssd: dot form below 128 rows, "
     "GEMM form on packed panels from 128); w-scale on int32. Without the "
     "kernel: 2 int8 digits per row, XLA int8 dot"),
    ("w8a8 DRQ", dict(weight_qtype="int8", act_qtype="int8",
                      act_static_scale=False),
     "per-row dynamic int8 act x [N,K] int8 weight in the CPU kernel (VNNI "
     "vpdpbusd: dot form below 16 rows, GEMM form on packed u8 panels from "
     "16, +128 shift undone with row sums); XLA int8 dot without it"),
    ("w8a8 SRQ", dict(weight_qtype="int8", act_qtype="int8",
                      act_static_scale=True),
     "calibrated per-tensor int8 act; ones row gives the zero-point term; "
     "same kernel as DRQ"),
    ("w4 weight-only", dict(weight_qtype="int4", act_qtype=None),
     "int4 packed 2/byte [N,K/2], unpacked in registers by the CPU kernel; "
     "int16 act as w8 weight-only (XLA: shift-unpack to int8)"),
]


def _time(fns: dict, reps: int) -> dict:
  """Median seconds per call, variants interleaved round by round."""
  for f, args in fns.values():
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, (f, args) in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[k].append(time.perf_counter() - t)
  return {k: float(np.median(v)) for k, v in times.items()}


def bench_model(name, model, x_shape, batches, reps):
  rng = np.random.default_rng(0)
  rows = []
  for batch in batches:
    x = rng.standard_normal((batch,) + x_shape).astype(np.float32)
    calib = [rng.standard_normal((batch,) + x_shape).astype(np.float32)
             for _ in range(4)]
    variables = model.init(jax.random.key(0), x)
    f32 = jax.jit(model.apply)
    ref = np.asarray(f32(variables, x))
    fns, outs, nbytes, paths = {}, {}, {}, {}
    fns["f32"] = (f32, (variables, x))
    nbytes["f32"] = xla.param_bytes(variables)
    vb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables)
    fns["bf16"] = (jax.jit(model.apply), (vb, x.astype(jnp.bfloat16)))
    nbytes["bf16"] = xla.param_bytes(vb)
    for label, kw, path in VARIANTS:
      paths[label] = path
      if kw is None:
        continue
      rules = [qlite.QuantizationRule(module_path=".*", **kw)]
      stats = None
      if kw.get("act_static_scale") and kw.get("act_qtype"):
        stats = qlite.calibrate(model, rules, calib, variables=variables,
                                progress=False)
      provider = xla.PtqProvider(rules, stats)
      qm = xla.quantize_model(provider=provider, model=model,
                              variables=variables)
      abstract = xla.abstract_quantized_params(model, rules, x,
                                               variables=variables)
      qparams = xla.quantize_params(variables, abstract)
      g, state = qm.traced((x,))
      flat = jax.tree.leaves(qparams, is_leaf=lambda a: isinstance(
          a, qlite.core.QArray))
      # The provider's run-time form: QArrays packed once in the layout each
      # dot wants (what PtqModel.apply caches).
      flat = provider.prepare_flat_params(g, state, flat)
      fn = jax.jit(provider.function(g, state))
      fns[label] = (lambda fp, xx, fn=fn: fn(fp, [xx])[0], (flat, x))
      nbytes[label] = xla.param_bytes(qparams)
    for label, (f, args) in fns.items():
      outs[label] = np.asarray(f(*args), np.float32)
    times = _time(fns, reps)
    for label in fns:
      rows.append(dict(
          model=name, batch=batch, variant=label,
          ms=times[label] * 1e3, speed=times["f32"] / times[label],
          bytes=nbytes[label], bytes_ratio=nbytes[label] / nbytes["f32"],
          sqnr=sqnr_db(ref, outs[label]),
          path=paths.get(label, "float32 XLA dot")))
  return rows


def micro(reps):
  """The dot-level measurements behind the path choices (2048 x 2048)."""
  k = n = 2048
  rng = np.random.default_rng(0)
  wf = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32))
  wq = jnp.asarray(rng.integers(-7, 8, (k, n)).astype(np.int8))
  w4 = wq.astype(jnp.int4)
  dn = (((1,), (0,)), ((), ()))

  def idot(a, b):
    return lax.dot_general(a, b, dn, preferred_element_type=jnp.int32)

  def unpack(a, b):
    p = lax.bitcast_convert_type(b.reshape(k, n // 2, 2), jnp.int8)
    lo = lax.shift_right_arithmetic(lax.shift_left(p, jnp.int8(4)),
                                    jnp.int8(4))
    hi = lax.shift_right_arithmetic(p, jnp.int8(4))
    return jnp.stack([idot(a, lo), idot(a, hi)], -1).reshape(a.shape[0], n)

  x1 = jnp.asarray(rng.standard_normal((1, k)).astype(np.float32))
  x2q = jnp.asarray(rng.integers(-127, 128, (2, k)).astype(np.int8))
  x64 = jnp.asarray(rng.standard_normal((64, k)).astype(np.float32))
  x64q = x64.astype(jnp.int8)
  x512 = jnp.asarray(rng.standard_normal((512, k)).astype(np.float32))
  cases = {
      "f32 dot M=1": (jax.jit(lambda a, b: a @ b), (x1, wf)),
      "int8 dot M=1": (jax.jit(idot), (x2q[:1], wq)),
      "int8 dot M=2 (pad / 2 digits)": (jax.jit(idot), (x2q, wq)),
      "int8 dot M=2, weight [N,K]": (jax.jit(lambda a, b: lax.dot_general(
          a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)),
          (x2q, wq.T.copy())),
      "int4->int8 astype + dot M=2": (jax.jit(lambda a, b: idot(
          a, b.astype(jnp.int8))), (x2q, w4)),
      "int4 nibble unpack + dot M=2": (jax.jit(unpack), (x2q, w4)),
      "dequant f32 weight + dot M=1": (jax.jit(
          lambda a, b: a @ (b.astype(jnp.float32) * 0.01)), (x1, wq)),
      "f32 dot M=64": (jax.jit(lambda a, b: a @ b), (x64, wf)),
      "int8 dot M=64": (jax.jit(idot), (x64q, wq)),
      "int8 dot M=128 (2 digits of M=64)": (jax.jit(idot), (
          jnp.concatenate([x64q, x64q]), wq)),
      "f32 dot M=512": (jax.jit(lambda a, b: a @ b), (x512, wf)),
  }
  if cpu_kernels.available():
    wnk = jnp.asarray(wq.T.copy())
    x1q16 = jnp.asarray(rng.integers(-8191, 8192, (1, k)).astype(np.int16))
    x64q16 = jnp.asarray(rng.integers(-8191, 8192, (64, k)).astype(np.int16))
    x512q = jnp.asarray(rng.integers(-127, 128, (512, k)).astype(np.int8))
    x512q16 = jnp.asarray(rng.integers(-8191, 8192, (512, k))
                          .astype(np.int16))
    kdot = jax.jit(cpu_kernels.int8_dot_nk)
    cases.update({
        "qlite kernel int8 act M=1": (kdot, (x2q[:1], wnk)),
        "qlite kernel int16 act M=1 (weight-only)": (kdot, (x1q16, wnk)),
        "qlite kernel int8 act M=64": (kdot, (x64q, wnk)),
        "qlite kernel int16 act M=64 (weight-only)": (kdot, (x64q16, wnk)),
        "qlite kernel int8 act M=512": (kdot, (x512q, wnk)),
        "qlite kernel int16 act M=512 (weight-only)": (kdot, (x512q16, wnk)),
    })
  t = _time(cases, reps)
  return {k: v * 1e3 for k, v in t.items()}


def render(rows, mic) -> str:
  dev = jax.devices()[0]
  lines = [
      "# XLA PTQ benchmark (`python bench/xla_ptq.py`)", "",
      f"Device: {dev.platform} ({dev.device_kind}), {os.cpu_count()} CPUs, "
      f"{platform.processor() or platform.machine()}; jax {jax.__version__}."
      " All variants of one model/batch were timed in the same run, "
      "interleaved round by round; latency is the median. Speed = f32 time"
      " / variant time (>1 is faster). SQNR is the output vs f32.", "",
      "| model | batch | variant | median ms | speed vs f32 | param bytes |"
      " bytes vs f32 | SQNR dB | compute path |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    sq = "inf" if math.isinf(r["sqnr"]) else f"{r['sqnr']:.1f}"
    lines.append(
        f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms']:.3f} | "
        f"{r['speed']:.2f}x | {r['bytes']:,} | {r['bytes_ratio']:.3f} | {sq} "
        f"| {r['path']} |")
  lines += ["", "Why these paths: `docs/xla_cpu_paths.md` (measured findings)."]
  lines += ["", "## Why each path (dot-level, 2048 x 2048, same run)", "",
            "| dot | median ms | speed vs f32 dot at the same M (M=2: vs M=1) |",
            "|---|---|---|"]
  for k, v in mic.items():
    # vs f32 at the same M (the last "M=" names it: 2 digits of M=64 -> 64)
    m = re.findall(r"M=(\d+)", k)[-1]
    base = mic.get(f"f32 dot M={m}", mic["f32 dot M=1"])
    lines.append(f"| {k} | {v:.3f} | {base / v:.2f}x |")
  return "\n".join(lines) + "\n"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=30)
  args = ap.parse_args()
  rows = bench_model("MLP 4x2048", MLP(), (2048,), (1, 64), args.reps)
  rows += bench_model("transformer block d768 (8 tokens)", Block(), (8, 768),
                      (1, 64), max(10, args.reps // 2))
  mic = micro(args.reps)
  text = render(rows, mic)
  print(text)
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                     "RESULTS_xla.md")
  with open(out, "w") as f:
    f.write(text)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import _results
  section = text.replace("# XLA PTQ", "## XLA PTQ", 1)
  print(f"wrote {_results.write_section('xla', section)}")


if __name__ == "__main__":
  main()
