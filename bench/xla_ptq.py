"""XLA PTQ benchmark, per CPU kernel instruction-set family.

Default run: the 768 -> 3 x 1536 -> 256 MLP and a transformer block (d768,
8 tokens), batch 1 and 64, w8 weight-only and w8a8 DRQ, under every kernel
family this CPU supports (scalar, avx2, avxvnni, avx512bw, vnni, forced in
one process with ``qlite.kernels.cpu.use_isa``: the family is fixed at
trace time) and with the kernels off (XLA's own int8 dots), all timed side
by side against f32 (interleaved round by round, median latency), the whole
measurement repeated ``--repeats`` times to show its spread. Each cell
checks the bars: >= 0.95x "kernels off", and >= 1.0x f32 for w8 at batch 1.

    python bench/xla_ptq.py [--reps N] [--repeats R]
    python bench/xla_ptq.py --crossover   # kernel vs XLA per dot and M
                                          # (the KERNEL_MAX_ROWS table)
    python bench/xla_ptq.py --all         # + the older variant table
                                          # (bf16, SRQ, w4) and dot table

Prints markdown tables and writes them to bench/RESULTS_xla.md.
"""

from __future__ import annotations

import argparse
import contextlib
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


class MLP3(nn.Module):
  """768 -> 3 x 1536 -> 256 (issue 19's MLP)."""

  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = nn.relu(nn.Dense(1536)(x))
    return nn.Dense(256)(x)


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


def _time(fns: dict, reps: int, stat=np.median) -> dict:
  """Seconds per call (``stat`` over the rounds: median, or min on a shared
  machine), variants interleaved round by round."""
  for f, args in fns.values():
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, (f, args) in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[k].append(time.perf_counter() - t)
  return {k: float(stat(v)) for k, v in times.items()}


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


# -- per-family table ---------------------------------------------------------
ISA_MODES = [("w8", dict(weight_qtype="int8", act_qtype=None)),
             ("DRQ", dict(weight_qtype="int8", act_qtype="int8",
                          act_static_scale=False))]


def _families():
  """(label, family or None for kernels off) this CPU can run."""
  out = [("kernels off (XLA int8 dot)", None)]
  if cpu_kernels._load() and jax.default_backend() == "cpu":
    feats = cpu_kernels.cpu_features()
    out += [(f, f) for f in cpu_kernels.FAMILIES if feats.get(f)]
  return out


def _quantized_fn(model, variables, x, kw, fam):
  """A jitted quantized forward traced under kernel family ``fam``."""
  rules = [qlite.QuantizationRule(module_path=".*", **kw)]
  provider = xla.PtqProvider(rules, None)
  qm = xla.quantize_model(provider=provider, model=model, variables=variables)
  abstract = xla.abstract_quantized_params(model, rules, x,
                                           variables=variables)
  qparams = xla.quantize_params(variables, abstract)
  g, state = qm.traced((x,))
  flat = jax.tree.leaves(qparams, is_leaf=lambda a: isinstance(
      a, qlite.core.QArray))
  flat = provider.prepare_flat_params(g, state, flat)
  fn = jax.jit(provider.function(g, state))
  f = lambda fp, xx, fn=fn: fn(fp, [xx])[0]
  with cpu_kernels.use_isa(fam):       # trace (and compile) now
    out = np.asarray(f(flat, x), np.float32)
  return f, (flat, x), out


def bench_isa(name, model, x_shape, batches, reps, repeats):
  """{(family label, mode, batch): [speed vs f32 per repeat]} and SQNRs."""
  rng = np.random.default_rng(0)
  speeds, sqnrs, counts = {}, {}, {}
  for batch in batches:
    x = rng.standard_normal((batch,) + x_shape).astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    f32 = jax.jit(model.apply)
    ref = np.asarray(f32(variables, x))
    fns = {"f32": (f32, (variables, x))}
    same = []           # variants whose every dot went to XLA
    off_label = _families()[0][0]
    for label, fam in _families():
      for mode, kw in ISA_MODES:
        before = sum(cpu_kernels.isa_counts().values()) if \
            cpu_kernels._load() else 0
        f, args, out = _quantized_fn(model, variables, x, kw, fam)
        sqnrs[(label, mode, batch)] = sqnr_db(ref, out)
        calls = 0
        if cpu_kernels._load():
          calls = sum(cpu_kernels.isa_counts().values()) - before
          counts[(label, mode, batch)] = calls
        if fam is not None and calls == 0:
          # The dispatch sent every dot to XLA: the same program as kernels
          # off (timing it again would only measure this machine's noise).
          same.append((label, mode))
          continue
        fns[(label, mode)] = (f, args)
    for _ in range(repeats):
      t = _time(fns, reps, np.min)
      for key in fns:
        if key != "f32":
          speeds.setdefault(key + (batch,), []).append(t["f32"] / t[key])
      for label, mode in same:
        speeds.setdefault((label, mode, batch), []).append(
            t["f32"] / t[(off_label, mode)])
    print(f"  {name} batch {batch}: done", flush=True)
  return speeds, sqnrs, counts


def render_isa(results, reps, repeats) -> str:
  dev = jax.devices()[0]
  lines = [
      "# XLA PTQ benchmark per CPU kernel family (`python bench/xla_ptq.py`)",
      "",
      f"Device: {dev.platform} ({dev.device_kind}), {os.cpu_count()} CPUs, "
      f"{platform.processor() or platform.machine()}; jax {jax.__version__}."
      f" Speed = f32 time / variant time, each time the fastest of {reps} "
      f"interleaved rounds (every variant of one model and batch side by "
      f"side in one process; the minimum, not the median: other jobs load "
      f"this machine's 2 cores and only ever add time); the measurement was "
      f"repeated {repeats} times: the cell is the median speed, [min-max] "
      "over the repeats. A cell whose dispatch sent every dot to XLA (0 "
      "kernel calls: below the family's crossover the kernel is not used) "
      "runs the same program as \"kernels off\" and shows \"= off\" "
      "instead of a second timing of that program (in an earlier run such "
      "twin timings differed by up to 25% on this loaded machine: noise, "
      "not a path). Each family is forced "
      "with `qlite.kernels.cpu.use_isa` (as `QLITE_CPU_KERNELS_ISA` does per "
      "process) and dispatches by its measured crossover table "
      "(`KERNEL_MAX_ROWS`: the kernel only where it beat XLA). "
      "\"kernels off\" is XLA's own int8 dot. Bars: every cell >= 0.95x "
      "the kernels-off cell; w8 batch 1 >= 1.0x f32.", ""]
  bad = []
  for name, (speeds, sqnrs, counts) in results.items():
    lines += [f"## {name}", "",
              "| path | w8 batch 1 | w8 batch 64 | w8a8 DRQ batch 1 | "
              "w8a8 DRQ batch 64 | kernel calls per forward (w8 b1 / b64, "
              "DRQ b1 / b64) |", "|---|---|---|---|---|---|"]
    labels = [label for label, _ in _families()]
    for label in labels:
      cells, calls = [], []
      for mode in ("w8", "DRQ"):
        for batch in (1, 64):
          v = speeds[(label, mode, batch)]
          off = speeds[(labels[0], mode, batch)]
          med, lo, hi = np.median(v), min(v), max(v)
          ratio = med / np.median(off)
          flag = ""
          if ratio < 0.95:
            flag += " **<0.95x off**"
            bad.append(f"{name} {label} {mode} b{batch}: {ratio:.2f}x off")
          if mode == "w8" and batch == 1 and med < 1.0:
            flag += " **<1x f32**"
            bad.append(f"{name} {label} w8 b1: {med:.2f}x f32")
          n_calls = counts.get((label, mode, batch))
          if label != labels[0] and n_calls == 0:
            cells.append("= off (all XLA)")
          else:
            cells.append(f"{med:.2f}x [{lo:.2f}-{hi:.2f}]{flag}")
          calls.append("-" if n_calls is None else str(n_calls))
      lines.append(f"| {label} | " + " | ".join(cells) +
                   f" | {' / '.join(calls)} |")
    sq = [v for v in sqnrs.values() if np.isfinite(v)]
    lines += ["", f"SQNR vs f32 over these cells: {min(sq):.1f} - "
              f"{max(sq):.1f} dB.", ""]
  lines += ["Bars: " + ("all cells pass." if not bad else
                        "FAIL: " + "; ".join(bad)), ""]
  return "\n".join(lines) + "\n"


# -- crossover: kernel vs XLA per dot and row count -----------------------------
@contextlib.contextmanager
def _kernel_always():
  saved = {f: dict(t) for f, t in cpu_kernels.KERNEL_MAX_ROWS.items()}
  for t in cpu_kernels.KERNEL_MAX_ROWS.values():
    for key in t:
      t[key] = cpu_kernels.MAX_M
  try:
    yield
  finally:
    for f, t in saved.items():
      cpu_kernels.KERNEL_MAX_ROWS[f].update(t)


CROSS_SHAPES = [(1536, 1536), (768, 3072)]
CROSS_M = (1, 4, 16, 64, 512)


def crossover(reps, ms=CROSS_M, repeats=1, only=None):
  """Per family, dot kind and shape: kernel time / XLA time at each M
  (< 1: the kernel wins), ``repeats`` times. Returns {(fam, mode, shape):
  {m: [ratio per repeat]}}."""
  from qlite.core import quantize
  dn = (((1,), (0,)), ((), ()))
  rng = np.random.default_rng(0)
  modes = {"w8": dict(mode="weight_only"),
           "DRQ": dict(mode="drq", act_qtype="int8"),
           "w4": dict(mode="weight_only"),
           # DRQ on VNNI GEMM panels packed once (vnni family only)
           "DRQ panels": dict(mode="drq", act_qtype="int8")}
  fams = [f for l, f in _families() if f is not None and
          (only is None or f in only)]
  out = {}
  for (k, n) in CROSS_SHAPES:
    wf = rng.standard_normal((k, n)).astype(np.float32)
    packed = {}
    for wq in ("int8", "int4"):
      qw = quantize(wf, wq, channel_axes=(1,), narrow_range=True)
      packed[wq] = xla.matmul.pack_weight(qw, dn, 2, 1)
    with cpu_kernels.use_isa("vnni" if "vnni" in fams else None):
      packed["panels"] = xla.matmul.pack_weight(
          quantize(wf, "int8", channel_axes=(1,), narrow_range=True), dn, 2,
          1, act_int8=True)
    for m in ms:
      x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
      fns = {}
      for mode, kw in modes.items():
        w = packed["int4" if mode == "w4" else "panels" if
                   mode == "DRQ panels" else "int8"]
        for fam in [None] + fams:
          if mode == "DRQ panels" and fam not in (None, "vnni"):
            continue
          f = jax.jit(lambda x, w, kw=kw: xla.quantized_dot(x, w, dn, 1,
                                                            **kw))
          with cpu_kernels.use_isa(fam), _kernel_always():
            jax.block_until_ready(f(x, w))
          fns[(fam, mode)] = (f, (x, w))
      for _ in range(repeats):
        t = _time(fns, reps, np.min)
        for (fam, mode), v in t.items():
          if fam is not None:
            out.setdefault((fam, mode, (k, n)), {}).setdefault(m, []).append(
                v / t[(None, mode)])
        print(f"    {k}x{n} M={m}: " + ", ".join(
            f"{f}/{md} {v / t[(None, md)]:.2f}" for (f, md), v in t.items()
            if f is not None), flush=True)
    print(f"  crossover {k}x{n}: done", flush=True)
  return out


def render_crossover(res, ms=CROSS_M) -> str:
  lines = ["## Kernel vs XLA per dot (`python bench/xla_ptq.py --crossover`)",
           "", "Kernel time / XLA time for one quantized dot (activation "
           "quantization included; < 1.00: the kernel is faster), every "
           "family and XLA interleaved in one process; min-max over the "
           "repeats. w8: weight-only (int16 rows vs two int8 digit rows on "
           "XLA), DRQ: int8 rows, w4: weight-only int4. Last win: the "
           "largest M up to which the kernel won in every repeat.", "",
           "| family | dot | K x N | " + " | ".join(f"M={m}" for m in ms)
           + " | last win |",
           "|---|---|---|" + "---|" * len(ms) + "---|"]
  for (fam, mode, (k, n)), row in sorted(res.items(), key=lambda kv: (
      cpu_kernels.FAMILIES.index(kv[0][0]), kv[0][1], kv[0][2])):
    last = 0
    for m in ms:
      if max(row[m]) < 1.0:
        last = m
      else:
        break
    cells = [f"{min(row[m]):.2f}" if len(row[m]) == 1 else
             f"{min(row[m]):.2f}-{max(row[m]):.2f}" for m in ms]
    lines.append(f"| {fam} | {mode} | {k}x{n} | " + " | ".join(cells) +
                 f" | {last} |")
  return "\n".join(lines) + "\n"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--crossover", action="store_true")
  ap.add_argument("--m", default=",".join(str(m) for m in CROSS_M),
                  help="row counts for --crossover (comma-separated)")
  ap.add_argument("--families", default=None,
                  help="--crossover: only these families (comma-separated)")
  ap.add_argument("--all", action="store_true")
  args = ap.parse_args()
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                     "RESULTS_xla.md")
  if args.crossover:
    ms = tuple(int(v) for v in args.m.split(","))
    only = args.families.split(",") if args.families else None
    text = render_crossover(crossover(args.reps, ms, args.repeats, only), ms)
    print(text)
    if only is None:
      with open(out.replace(".md", "_crossover.md"), "w") as f:
        f.write(text)
    return
  results = {
      "MLP 768 -> 3 x 1536 -> 256": bench_isa(
          "MLP", MLP3(), (768,), (1, 64), args.reps, args.repeats),
      "transformer block d768 (8 tokens)": bench_isa(
          "block", Block(), (8, 768), (1, 64), args.reps, args.repeats)}
  text = render_isa(results, args.reps, args.repeats)
  if args.all:
    rows = bench_model("MLP 4x2048", MLP(), (2048,), (1, 64), args.reps)
    text += "\n" + render(rows, micro(args.reps)).replace(
        "# XLA PTQ", "## XLA PTQ", 1)
  print(text)
  with open(out, "w") as f:
    f.write(text)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import _results
  section = text.replace("# XLA PTQ", "## XLA PTQ", 1)
  print(f"wrote {_results.write_section('xla', section)}")


if __name__ == "__main__":
  main()
