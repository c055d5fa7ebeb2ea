"""Device check of the Pallas kernels: correctness against XLA and speed
against bf16, in one run of under 5 minutes (``make device-check``).

On a GPU / TPU every kernel form :class:`qlite.xla.PtqProvider` uses (w8a8
with the fused rescale, its static-range zero-point form, int4 packed
weights, per-K-tile scales, weight-only with in-kernel dequant for bf16
activations) runs compiled, is checked against its XLA twin (int8 forms
bit-exact, float forms within 1e-4 of the output range) and timed against
the twin (XLA's own int8 / bf16 path) and a plain bf16 matmul. A last
section runs an MLP through PtqProvider with ``QLITE_PALLAS=auto`` and
``off`` (same outputs; speed). From the timings it prints the largest M at
which each kernel beat both (the ``max_m`` to set in
``qlite/xla/pallas.py``'s THRESHOLDS). On CPU there is no accelerator: the
kernels run in Pallas interpret mode at tiny sizes, for correctness only,
and the script says so.

Prints a markdown table and writes it to
``bench/RESULTS_device_check_<backend>.md``; exits 1 when a check fails.
``docs/xla_accelerators.md`` describes the output.

    python bench/device_check.py [--budget 270] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import jax                                                    # noqa: E402
import jax.numpy as jnp                                       # noqa: E402

from qlite.kernels import matmul as kmm                       # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _time(fn, *args, budget_s=0.5, max_iters=200) -> float:
  """Median ms of ``fn(*args)`` (compiled already)."""
  jax.block_until_ready(fn(*args))
  times = []
  t_end = time.perf_counter() + budget_s
  while len(times) < 5 or (time.perf_counter() < t_end
                           and len(times) < max_iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def _case_data(m, k, n, *, packed, tiles, zp, float_x, seed=0):
  rng = np.random.default_rng(seed)
  hi = 7 if packed else 127
  w = rng.integers(-hi, hi + 1, (k, n)).astype(np.int8)
  ws = rng.uniform(0.5, 1.5, (tiles, n)).astype(np.float32) / 127
  if float_x:
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    xs = None
  else:
    x = jnp.asarray(rng.integers(-127, 128, (m, k)).astype(np.int8))
    xs = jnp.asarray(rng.uniform(0.5, 1.5, (m, 1)).astype(np.float32) / 127)
  zw = None
  if zp:
    zw = jnp.asarray(3 * w.astype(np.int32).reshape(
        tiles, k // tiles, n).sum(1))
  return x, w, xs, jnp.asarray(ws), zw


KERNELS = [  # name, float activations, int4 packed, tiles, zero point
    ("w8a8", False, False, 1, False),
    ("w8a8 srq (zero point)", False, False, 1, True),
    ("w4a8 (int4 packed)", False, True, 1, False),
    ("w4a8 tiles 256", False, True, "256", False),
    ("weight-only w8 bf16", True, False, 1, False),
    ("weight-only w4 bf16", True, True, 1, False),
]


_BF16_DOT = jax.jit(lambda a, b: jnp.dot(a, b,
                                         preferred_element_type=jnp.float32))


def run_kernels(impl, sizes, ms, deadline, rows, failures, timing):
  accel = timing
  for k, n in sizes:
    bf16 = {}
    for name, float_x, packed, tiles, zp in KERNELS:
      for m in ms:
        label = f"{k}x{n}"
        if time.perf_counter() > deadline:
          rows.append((name, m, label, "skipped (time budget)", "", "", "",
                       "", "", ""))
          continue
        t = k // int(tiles) if tiles != 1 else 1      # tiles along K
        tile = int(tiles) if tiles != 1 else None
        blocks = kmm.gpu_blocks(m, k, n, tile=tile, packed=packed,
                                min_block_m=32 if jax.default_backend() ==
                                "tpu" else 16)
        try:
          x, w, xs, ws, zw = _case_data(m, k, n, packed=packed, tiles=t,
                                        zp=zp, float_x=float_x)
          bm, bn, bk = blocks
          wk = kmm.pack_int4_kn(w, bk) if packed else jnp.asarray(w)
          kw = dict(block_m=bm, block_n=bn, block_k=bk, packed=packed)
          if float_x:
            f_p = jax.jit(lambda x, w, s: kmm.weight_only_matmul(
                x, w, s, impl=impl, **kw))
            f_x = jax.jit(lambda x, w, s: kmm.weight_only_matmul(
                x, w, s, impl="xla", **kw))
            args = (x, wk, ws)
          else:
            f_p = jax.jit(lambda x, w, a, s, z: kmm.w8a8_matmul(
                x, w, a, s, z, impl=impl, **kw))
            f_x = jax.jit(lambda x, w, a, s, z: kmm.w8a8_matmul(
                x, w, a, s, z, impl="xla", **kw))
            args = (x, wk, xs, ws, zw)
          got = np.asarray(f_p(*args))
          ref = np.asarray(f_x(*args))
          scale = float(np.abs(ref).max()) or 1.0
          err = float(np.abs(got - ref).max()) / scale
          exact = not float_x and t == 1
          ok = bool(np.array_equal(got, ref)) if exact else err <= 1e-4
          check = ("exact" if exact else "<=1e-4") + (" PASS" if ok else
                                                      " FAIL")
          if not ok:
            failures.append(f"{name} M={m} {label}: max err {err:.2e}")
          if accel:
            t_p = _time(f_p, *args)
            t_x = _time(f_x, *args)
            if m not in bf16:          # the float model's matmul
              xb = jnp.asarray(np.random.default_rng(1).standard_normal(
                  (m, k)), jnp.bfloat16)
              bf16[m] = _time(_BF16_DOT, xb, jnp.asarray(w, jnp.bfloat16))
            t_b = bf16[m]
            rows.append((name, m, label, check, f"{err:.1e}", f"{t_p:.3f}",
                         f"{t_x:.3f}", f"{t_b:.3f}", f"{t_b / t_p:.2f}x",
                         f"{t_x / t_p:.2f}x"))
          else:
            rows.append((name, m, label, check, f"{err:.1e}", "-", "-", "-",
                         "-", "-"))
        except Exception as e:  # a lowering / compile error is a result
          failures.append(f"{name} M={m} {label}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}")
          traceback.print_exc(limit=3)
          rows.append((name, m, label, "ERROR", type(e).__name__, "", "", "",
                       "", ""))


def run_provider(impl, deadline, failures, timing):
  """An MLP through PtqProvider, QLITE_PALLAS=auto (or interpret) vs off."""
  if time.perf_counter() > deadline:
    return ["provider: skipped (time budget)"]
  import flax.linen as nn                      # pylint: disable=import-outside-toplevel
  import qlite                                 # pylint: disable=import-outside-toplevel
  from qlite import xla                        # pylint: disable=import-outside-toplevel
  from qlite.xla import pallas as pallas_lib   # pylint: disable=import-outside-toplevel

  accel = impl == "pallas"
  width, hidden, batch = (1024, 4096, 8) if accel else (256, 256, 4)
  on = "auto" if accel else "interpret"

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(width)(nn.relu(nn.Dense(hidden)(x)))

  model = MLP()
  x = np.random.default_rng(0).standard_normal((batch, width)).astype(
      np.float32)
  variables = model.init(jax.random.key(0), x)
  lines = [f"provider: MLP {width}->{hidden}->{width}, batch {batch}, "
           f"DRQ int8 and weight-only int4"]
  for label, rule in [
      ("drq w8a8", qlite.QuantizationRule(act_static_scale=False)),
      ("weight-only w4", qlite.QuantizationRule(weight_qtype="int4",
                                                act_qtype=None))]:
    outs, times, used = {}, {}, {}
    for mode in ("off", on):
      os.environ["QLITE_PALLAS"] = mode
      if accel:       # the MLP's weights are 4M elements: under THRESHOLDS
        os.environ["QLITE_PALLAS_MIN_WEIGHT"] = "0"
      qm = xla.quantize_model(model, xla.PtqProvider([rule]),
                              variables=variables)
      graph, state = qm.traced((x,))
      flat = qm.provider.prepare_flat_params(graph, state,
                                             jax.tree.leaves(variables))
      used[mode] = sum(isinstance(p, pallas_lib.PallasWeight) for p in flat)
      outs[mode] = np.asarray(qm.apply(variables, x))
      if timing:
        times[mode] = _time(lambda: qm.apply(variables, x))
    os.environ.pop("QLITE_PALLAS", None)
    os.environ.pop("QLITE_PALLAS_MIN_WEIGHT", None)
    ref = outs["off"]
    err = float(np.abs(outs[on] - ref).max()) / float(np.abs(ref).max())
    tol = 0.0 if label.startswith("drq") else 1e-4
    ok = used[on] == 2 and used["off"] == 0 and err <= tol
    if not ok:
      failures.append(f"provider {label}: {used[on]} dots on Pallas, max "
                      f"err {err:.2e} (tolerance {tol})")
    t = (f", {times['off']:.3f} ms off -> {times[on]:.3f} ms "
         f"({times['off'] / times[on]:.2f}x)") if timing else ""
    lines.append(f"- {label}: {used[on]}/2 dots on Pallas, max err "
                 f"{err:.1e} vs QLITE_PALLAS=off: {'PASS' if ok else 'FAIL'}"
                 f"{t}")
  return lines


def suggest(rows) -> list[str]:
  """Per kernel: the largest M up to which it beat bf16 and XLA at every
  measured M (the THRESHOLDS max_m to set)."""
  out = []
  for name, *_ in KERNELS:
    timed = sorted((int(r[1]), float(r[8][:-1]) > 1.0 and
                    float(r[9][:-1]) > 1.0)
                   for r in rows if r[0] == name and r[8].endswith("x"))
    best = None
    for m, win in timed:
      if not win:
        break
      best = m
    out.append(f"- {name}: " + (f"max_m = {best}" if best else
                                "max_m = 0 (slower than bf16 or XLA at the "
                                "smallest M)"))
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--budget", type=float, default=270.0,
                  help="seconds after which remaining timings are skipped")
  ap.add_argument("--no-write", action="store_true",
                  help="print only; do not write bench/RESULTS_*.md")
  ap.add_argument("--cpu-timing", action="store_true",
                  help="on CPU, also run the timing code (interpret-mode "
                  "timings mean nothing: a dry run of the accelerator path)")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  deadline = t0 + args.budget
  backend = jax.default_backend()
  accel = backend in ("gpu", "tpu")
  impl = "pallas" if accel else "interpret"
  dev = jax.devices()[0]
  head = [f"# qlite device check ({backend})", "",
          f"backend={backend} device={getattr(dev, 'device_kind', dev)} "
          f"jax={jax.__version__} python={platform.python_version()} "
          f"kernels={impl}"]
  if accel:
    sizes, ms = [(4096, 4096)], [1, 16, 64, 256]
  else:
    head.append("no accelerator: Pallas interpret mode at tiny sizes, "
                "correctness only, no timings")
    sizes, ms = [(512, 256)], [1, 16]
  timing = accel or args.cpu_timing
  rows, failures = [], []
  run_kernels(impl, sizes, ms, deadline, rows, failures, timing)
  table = ["| kernel | M | K x N | check | max err | pallas ms | xla ms | "
           "bf16 ms | vs bf16 | vs xla |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  table += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  prov = run_provider(impl, deadline, failures, timing)
  lines = head + [""] + table + [""] + prov
  if timing:
    lines += ["", "suggested thresholds (largest M up to which the kernel "
              "beat both bf16 and XLA at every measured M):"] + suggest(rows)
  n_checks = len(rows) + len(prov) - 1
  lines += ["", f"RESULT: {'PASS' if not failures else 'FAIL'} "
            f"({n_checks - len(failures)}/{n_checks} checks) in "
            f"{time.perf_counter() - t0:.0f} s"]
  lines += [f"- {f}" for f in failures]
  text = "\n".join(lines)
  print(text)
  if not args.no_write:
    path = os.path.join(HERE, f"RESULTS_device_check_{backend}.md")
    with open(path, "w") as f:
      f.write(text + "\n\nWritten by `python bench/device_check.py` "
              "(`make device-check`).\n")
    print(f"\nwrote {path}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
