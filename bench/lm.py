"""On-device LM benchmark (issue 18): a Gemma-style decoder LM exported as
one ``.tflite`` with ``prefill`` + ``decode`` signatures (KV cache), per
weight format: file size vs float, export time and peak RSS, prefill
latency, decode tokens/s (XNNPACK, 1 and 2 threads), peak RSS while
generating, and greedy agreement with the JAX float model over 32 new
tokens.

    python bench/lm.py                 # ~40M params: d 512, 8 layers, vocab 32k
    python bench/lm.py --size small    # d 256, 4 layers, vocab 8k (~5 min)

Each export runs in a fresh subprocess (its peak RSS is the export's, with
the model's float weights and the JAX runtime in it); each generation
measurement too (peak RSS of a process that loads the ``.tflite`` with
LiteRT and runs prefill + decode; the JAX runtime is not imported there).
Random weights (seed 0); the prompt is 128 random ids for the prefill
timing, 16 for the agreement. Agreement: at each of 32 positions, the
format's argmax given JAX float's greedy continuation (teacher-forced)
equals JAX's; "free run" is how many tokens the format's own greedy
generation matches before the first difference. Writes
``bench/RESULTS_lm.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FORMATS = ("float", "int8", "int8_dynamic", "int4", "int4_dynamic",
           "int4_block32", "int4_block64", "int4_block128")
PREFILL_LEN = 128
AGREE_PROMPT = 16
NEW_TOKENS = 32


def _config(size: str):
  from qlite.zoo import gemma_lm
  if size == "bench":
    return gemma_lm.BENCH
  if size == "small":
    return gemma_lm.LMConfig(vocab=8000, d_model=256, num_layers=4,
                             num_heads=4, num_kv_heads=2, head_dim=64,
                             mlp_dim=768, max_len=256)
  if size == "tiny":
    return gemma_lm.LMConfig(vocab=512, d_model=128, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=32,
                             mlp_dim=256, max_len=192)
  raise SystemExit(f"unknown --size {size!r}")


def _peak_rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


# --------------------------------------------------------------------------
# workers (run as subprocesses of this script)

def worker_export(size: str, fmt: str, out: str) -> dict:
  """Builds the seeded model and exports it in format ``fmt``."""
  import numpy as np
  import qlite
  from qlite.zoo import gemma_lm
  cfg = _config(size)
  model, variables = gemma_lm.build_linen(cfg, seed=0)
  base = _rss_mb()
  args = gemma_lm.signature_args(cfg, PREFILL_LEN)
  names = gemma_lm.signature_io_names(cfg)
  sigs = {k: (k, args[k]) + names[k] for k in ("prefill", "decode")}
  t0 = time.perf_counter()
  blob = qlite.export_tflite(model, signatures=sigs, variables=variables,
                             weights=fmt, path=out)
  dt = time.perf_counter() - t0
  return {"bytes": len(blob), "export_s": dt, "rss_before_mb": base,
          "export_peak_mb": _peak_rss_mb(),
          "params": int(sum(np.size(x) for x in
                            __import__("jax").tree.leaves(variables)))}


def worker_run(path: str, threads: int, prompt: list, ref: list,
               runs: int) -> dict:
  """LiteRT only: prefill latency, decode tokens/s, agreement."""
  import importlib.util
  import numpy as np
  # Load qlite/litert/generate.py without importing the qlite package (its
  # __init__ pulls in JAX): the RSS is LiteRT's.
  sys.modules.setdefault("qlite", type(sys)("qlite"))
  sys.modules.setdefault("qlite.litert", type(sys)("qlite.litert"))
  for name, rel in (("qlite.errors", "qlite/errors.py"),
                    ("qlite.litert.runtime", "qlite/litert/runtime.py"),
                    ("qlite.litert.generate", "qlite/litert/generate.py")):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT,
                                                                     rel))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
  gen = sys.modules["qlite.litert.generate"]
  base = _rss_mb()
  runner = gen.LMRunner(path, num_threads=threads)
  rng = np.random.default_rng(1)
  long_prompt = rng.integers(0, runner.vocab, PREFILL_LEN).astype(np.int32)
  caches = runner.empty_caches()
  times, cpu = [], []
  for _ in range(runs):
    t0, c0 = time.perf_counter(), time.process_time()
    logits, c = runner.step("prefill", long_prompt[None], PREFILL_LEN, caches)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  prefill_ms = statistics.median(times) * 1e3
  prefill_cpu_ms = statistics.median(cpu) * 1e3
  # decode: NEW_TOKENS steps after the 128-token prefill
  dec, dec_cpu = [], []
  for _ in range(runs):
    tok, cc = int(np.argmax(logits)), c
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(NEW_TOKENS):
      lg, cc = runner.step("decode", [[tok]], PREFILL_LEN + i, cc)
      tok = int(np.argmax(lg))
    dec.append(time.perf_counter() - t0)
    dec_cpu.append(time.process_time() - c0)
  tok_s = NEW_TOKENS / statistics.median(dec)
  tok_s_cpu = NEW_TOKENS / statistics.median(dec_cpu)
  lf = runner.logits_for(prompt, ref)
  agree = float(np.mean(lf.argmax(-1) == np.asarray(ref)))
  own = runner.generate(prompt, NEW_TOKENS).tokens
  free = next((i for i, (a, b) in enumerate(zip(own, ref)) if a != b),
              NEW_TOKENS)
  return {"prefill_ms": prefill_ms, "decode_tok_s": tok_s,
          "prefill_cpu_ms": prefill_cpu_ms, "decode_tok_s_cpu": tok_s_cpu,
          "agree": agree, "free_run": free, "rss_before_mb": base,
          "run_peak_mb": _peak_rss_mb()}


def worker_export_full_int8(size: str, out: str) -> dict:
  """qlite's own full-integer 8x8 export (static int8 activations) of the
  full-sequence forward at PREFILL_LEN tokens (no cache: qlite's
  full-integer path exports one function), for comparison. The embedding
  is a plain take (the composite lookup has no int8 form there)."""
  import dataclasses
  import numpy as np
  import qlite
  from qlite.zoo import gemma_lm
  cfg = dataclasses.replace(_config(size), composite_lookup=False)
  model, variables = gemma_lm.build_linen(cfg, seed=0)
  base = _rss_mb()
  rng = np.random.default_rng(3)
  batches = [rng.integers(0, cfg.vocab, (2, PREFILL_LEN)).astype(np.int32)
             for _ in range(8)]
  rules = [qlite.QuantizationRule()]
  t0 = time.perf_counter()
  stats = qlite.calibrate(model, rules, batches, variables=variables,
                          progress=False)
  blob = qlite.export_tflite(model, rules, stats, batches[0][:1],
                             variables=variables, path=out)
  dt = time.perf_counter() - t0
  info = qlite.inspect_tflite(blob)
  return {"bytes": len(blob), "export_s": dt, "rss_before_mb": base,
          "export_peak_mb": _peak_rss_mb(), "full_integer": info.full_integer}


def worker_run_full_int8(path: str, threads: int, prompt: list, ref: list,
                         runs: int) -> dict:
  """LiteRT: one full forward of PREFILL_LEN tokens (logits at every
  position), and teacher-forced agreement from the same forward over
  prompt + reference (zero-padded: causal)."""
  import numpy as np
  from ai_edge_litert.interpreter import Interpreter
  base = _rss_mb()
  it = Interpreter(model_path=path, num_threads=threads)
  run = it.get_signature_runner()
  name = next(iter(run.get_input_details()))
  out_name = next(iter(run.get_output_details()))
  seq = np.zeros((1, PREFILL_LEN), np.int32)
  seq[0, :len(prompt) + len(ref)] = prompt + ref
  times, cpu = [], []
  for _ in range(runs):
    t0, c0 = time.perf_counter(), time.process_time()
    y = run(**{name: seq})[out_name]
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  d = run.get_output_details()[out_name]
  scale, zp = d["quantization"]
  y = (y.astype(np.float32) - zp) * scale if scale else y
  got = y[0, len(prompt) - 1:len(prompt) - 1 + len(ref)].argmax(-1)
  return {"prefill_ms": statistics.median(times) * 1e3,
          "prefill_cpu_ms": statistics.median(cpu) * 1e3,
          "agree": float(np.mean(got == np.asarray(ref))),
          "rss_before_mb": base, "run_peak_mb": _peak_rss_mb()}


def worker_export_full_int8_decode(size: str, out: str) -> dict:
  """qlite's full-integer 8x8 export of the decode step with the KV cache
  (gemma_lm.DecodeStep: one function, so one signature), calibrated on 8
  decode calls after JAX float prefills of random 128-token prompts."""
  import dataclasses
  import numpy as np
  import qlite
  from qlite.zoo import gemma_lm
  cfg = dataclasses.replace(_config(size), composite_lookup=False)
  model, variables = gemma_lm.build_linen(cfg, seed=0)
  step, step_vars = gemma_lm.DecodeStep(cfg), gemma_lm.step_variables(
      variables)
  base = _rss_mb()
  rng = np.random.default_rng(3)
  t0 = time.perf_counter()
  batches = []
  for _ in range(8):
    ids = rng.integers(0, cfg.vocab, (1, PREFILL_LEN)).astype(np.int32)
    pre = model.apply(variables, ids, np.int32(PREFILL_LEN),
                      *cfg.empty_caches(), method="prefill")
    batches.append((rng.integers(0, cfg.vocab, (1, 1)).astype(np.int32),
                    np.int32(PREFILL_LEN)) +
                   tuple(np.asarray(c) for c in pre[1:]))
  rules = [qlite.QuantizationRule()]
  stats = qlite.calibrate(step, rules, batches, variables=step_vars,
                          progress=False)
  blob = qlite.export_tflite(step, rules, stats, batches[0],
                             variables=step_vars, path=out)
  dt = time.perf_counter() - t0
  info = qlite.inspect_tflite(blob)
  return {"bytes": len(blob), "export_s": dt, "rss_before_mb": base,
          "export_peak_mb": _peak_rss_mb(), "full_integer": info.full_integer}


def worker_run_full_int8_decode(path: str, threads: int, prompt: list,
                                ref: list, runs: int) -> dict:
  """LiteRT: decode tokens/s at positions 128.. (zero caches: the cost does
  not depend on their values), and teacher-forced agreement with every
  prompt token fed through decode from empty caches."""
  import numpy as np
  from ai_edge_litert.interpreter import Interpreter
  base = _rss_mb()
  it = Interpreter(model_path=path, num_threads=threads)
  run = it.get_signature_runner()
  di, do = run.get_input_details(), run.get_output_details()
  key = lambda n: int(n.rsplit("_", 1)[-1])
  ins, outs = sorted(di, key=key), sorted(do, key=key)

  def q(x, d):
    scale, zp = d["quantization"]
    if np.dtype(d["dtype"]) == np.int8 and scale:
      return np.clip(np.round(x / scale) + zp, -128, 127).astype(np.int8)
    return np.asarray(x, d["dtype"])

  def dq(y, d):
    scale, zp = d["quantization"]
    return (y.astype(np.float32) - zp) * scale if scale and \
        np.dtype(d["dtype"]) == np.int8 else y

  caches0 = [np.zeros(di[n]["shape"], np.float32) for n in ins[2:]]

  def step(tok, pos, caches):
    feed = {ins[0]: np.asarray([[tok]], np.int32),
            ins[1]: np.asarray(pos, np.int32)}
    feed.update({n: q(c, di[n]) for n, c in zip(ins[2:], caches)})
    o = run(**feed)
    return dq(o[outs[0]], do[outs[0]]).reshape(-1), \
        [dq(o[n], do[n]) for n in outs[1:]]
  dec, dec_cpu = [], []
  for _ in range(runs):
    caches, tok = caches0, 1
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(NEW_TOKENS):
      lg, caches = step(tok, PREFILL_LEN + i, caches)
      tok = int(np.argmax(lg))
    dec.append(time.perf_counter() - t0)
    dec_cpu.append(time.process_time() - c0)
  seq, caches, got = prompt + ref, caches0, []
  for pos in range(len(seq) - 1):
    lg, caches = step(seq[pos], pos, caches)
    if pos >= len(prompt) - 1:
      got.append(int(np.argmax(lg)))
  return {"decode_tok_s": NEW_TOKENS / statistics.median(dec),
          "decode_tok_s_cpu": NEW_TOKENS / statistics.median(dec_cpu),
          "agree": float(np.mean(np.asarray(got) == np.asarray(ref))),
          "rss_before_mb": base, "run_peak_mb": _peak_rss_mb()}


def worker_reference(size: str, prompt: list) -> dict:
  """JAX float greedy continuation of ``prompt``."""
  from qlite.zoo import gemma_lm
  cfg = _config(size)
  model, variables = gemma_lm.build_linen(cfg, seed=0)
  t0 = time.perf_counter()
  tokens, _ = gemma_lm.greedy_reference(lambda ids: model.apply(variables,
                                                                ids),
                                        prompt, NEW_TOKENS)
  return {"tokens": tokens, "s": time.perf_counter() - t0}


def _sub(args: list, timeout: int = 3600) -> dict:
  out = subprocess.run([sys.executable, os.path.abspath(__file__),
                        "--worker"] + [json.dumps(a) for a in args],
                       capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
  if out.returncode != 0:
    raise RuntimeError(f"worker {args[0]} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------

def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default="bench", choices=["bench", "small", "tiny"])
  p.add_argument("--formats", default=",".join(FORMATS))
  p.add_argument("--threads", default="1,2")
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--out", default=os.path.join(HERE, "RESULTS_lm.md"))
  p.add_argument("--keep-dir", default=None,
                 help="write the .tflite files here (default: a temporary "
                 "directory, removed)")
  p.add_argument("--scaling-log", default=None,
                 help="with --from-logs: the log of a run at another "
                 "--size; adds the measured scaling and a 1B / 2B "
                 "extrapolation")
  p.add_argument("--from-logs", default=None,
                 help="comma-separated stdout logs of earlier runs (same "
                 "--size): rebuild the table from their per-format JSON "
                 "lines instead of measuring")
  a = p.parse_args(argv)
  import numpy as np
  cfg = _config(a.size)
  formats = a.formats.split(",")
  threads = [int(t) for t in a.threads.split(",")]
  prompt = [int(t) for t in np.random.default_rng(2).integers(
      0, cfg.vocab, AGREE_PROMPT)]
  print(f"config: {cfg}  ({cfg.param_count() / 1e6:.1f}M params)",
        flush=True)
  if a.from_logs:
    rows = {}
    for log in a.from_logs.split(","):
      rows.update(_rows_from_log(log))
    md = _table(cfg, a, rows, threads, None)
    if a.scaling_log:
      md += _scaling(rows, _rows_from_log(a.scaling_log), threads[0])
    print(md)
    with open(a.out, "w") as f:
      f.write(md)
    print(f"wrote {a.out}")
    return
  ref = _sub(["reference", a.size, prompt])
  print(f"JAX float reference: {ref['s']:.1f} s", flush=True)
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    d = a.keep_dir or tmp
    os.makedirs(d, exist_ok=True)
    for fmt in formats:
      path = os.path.join(d, f"{fmt}.tflite")
      full = fmt in ("full_int8", "full_int8_decode")
      try:
        ex = _sub([f"export_{fmt}", a.size, path] if full else
                  ["export", a.size, fmt, path])
      except RuntimeError as e:
        print(f"{fmt}: export failed: {str(e)[-400:]}", flush=True)
        rows[fmt] = {"error": str(e).strip().splitlines()[-1][:200]}
        continue
      row = dict(ex)
      for t in threads:
        try:
          r = _sub([f"run_{fmt}" if full else "run", path, t, prompt,
                    ref["tokens"], a.runs])
        except RuntimeError as e:
          print(f"{fmt}: run failed: {str(e)[-400:]}", flush=True)
          row["error"] = str(e).strip().splitlines()[-1][:200]
          break
        row[t] = r
      rows[fmt] = row
      print(fmt, json.dumps(row), flush=True)
  md = _table(cfg, a, rows, threads, ref)
  print(md)
  with open(a.out, "w") as f:
    f.write(md)
  print(f"wrote {a.out}")


NOTES = """
## Weight formats on this stack (litert-converter 0.5.0, ai-edge-litert 2.3.0, ai-edge-quantizer 0.10.0)

| format | what the file holds | LiteRT kernels (XNNPACK, CPU) | verified by |
|---|---|---|---|
| float | float32 weights | FULLY_CONNECTED, BATCH_MATMUL, EMBEDDING_LOOKUP f32 | decode with the cache = JAX full-sequence logits (<= 1e-4 relative; tests/test_lm_export.py, Linen and NNX) |
| int8 | int8 per-channel weights + DEQUANTIZE | dequantized to float32 at load: float compute, float RAM | greedy agreement >= 90 % of 32 tokens (test) |
| int8_dynamic | int8 per-channel weights, hybrid FULLY_CONNECTED / EMBEDDING_LOOKUP | activations quantized per call (dynamic range) | greedy agreement >= 90 % (test) |
| int4 | int4 per-channel weights + DEQUANTIZE | dequantized at load; slower than float here | runs, INT4 tensors, agreement measured (test) |
| int4_dynamic | int4 per-channel weights, hybrid kernels | dynamic range | same |
| int4_block32 / 64 / 128 | int4 weights, one scale per block of 32 / 64 / 128 inputs | dynamic range (blockwise) | same; 128 needs d_model % 128 == 0 |
| full_int8 | qlite's own full-integer export (static int8 activations) of the full-sequence forward | int8 end to end | full_integer, agreement (slow test); no cache (one function) |
| full_int8_decode | qlite's own full-integer export of the decode step with the KV cache (`gemma_lm.DecodeStep`; caches int8 inside, float at the interface) | int8 end to end | full_integer, teacher-forced agreement after a float prefill, logits within 5 % (test) |

Not available: blockwise weight-only (the quantizer's blockwise weight-only
recipe returns the model unchanged, measured); static int8 activations in
the multi-signature file (qlite's full-integer path exports one function:
the decode step alone, `full_int8_decode`, or the full sequence,
`full_int8`; 16x8 is another issue's work).
The embedding lookup is an `odml.embedding_lookup` composite so that the
tied embedding is one buffer shared by EMBEDDING_LOOKUP and the output
FULLY_CONNECTED, quantized once (a plain `jnp.take` became GATHER_ND, whose
table stayed float32 and was duplicated per signature after quantization).
The agreement on these random-weight models is an easy case (their logits
are peaked); the trained character LM of `examples/lm_export.py` is the
harder one (below).
"""


def _rows_from_log(path: str) -> dict:
  rows = {}
  for line in open(path):
    head, _, rest = line.partition(" ")
    if rest.startswith("{") and head in FORMATS + ("full_int8",
                                                    "full_int8_decode"):
      rows[head] = json.loads(rest)
  return rows


def _scaling(big: dict, small: dict, t: int) -> str:
  """Linear fits in the float weight bytes W between two measured sizes,
  extrapolated to 1B and 2B parameters of the same architecture."""
  fb, fs = big["float"], small["float"]
  wb, ws = fb["bytes"] / 2**20, fs["bytes"] / 2**20
  pb, ps = fb["params"], fs["params"]

  def fit(key, rows_b=fb, rows_s=fs):
    slope = (rows_b[key] - rows_s[key]) / (wb - ws)
    return slope, rows_b[key] - slope * wb

  lines = ["", "## Scaling and a phone-size (1-2B) extrapolation", "",
           f"Measured at two sizes ({ps / 1e6:.1f}M and {pb / 1e6:.1f}M "
           f"parameters, `--size small` and `--size bench`); each figure "
           f"below is a straight line through the two, in the float weight "
           f"bytes W (4 bytes a parameter), extrapolated along the same "
           f"architecture.", "",
           "| figure | small | bench | per MiB of W | 1B params | 2B params |",
           "|---|---|---|---|---|---|"]
  targets = (1e9, 2e9)
  wt = [p * 4 / 2**20 for p in targets]

  def row(name, key, rows_b=fb, rows_s=fs, unit="", scale=1.0):
    slope, icpt = fit(key, rows_b, rows_s)
    vals = [(icpt + slope * w) * scale for w in wt]
    lines.append(f"| {name} | {rows_s[key] * scale:.1f}{unit} | "
                 f"{rows_b[key] * scale:.1f}{unit} | {slope * scale:.3f}"
                 f"{unit} | {vals[0]:.0f}{unit} | {vals[1]:.0f}{unit} |")
  row("float export, peak RSS", "export_peak_mb", unit=" MB")
  row("float export, time", "export_s", unit=" s")
  for fmt in ("int8_dynamic", "int4_block32"):
    if fmt in big and fmt in small:
      row(f"{fmt} export, peak RSS", "export_peak_mb", big[fmt], small[fmt],
          unit=" MB")
      b1 = big[fmt].get(t) or big[fmt].get(str(t))
      s1 = small[fmt].get(t) or small[fmt].get(str(t))
      if b1 and s1:
        row(f"{fmt} generating, peak RSS", "run_peak_mb", b1, s1,
            unit=" MB")
        # decode time per token ~ linear in the weight bytes read
        inv_b, inv_s = 1e3 / b1["decode_tok_s_cpu"], \
            1e3 / s1["decode_tok_s_cpu"]
        slope = (inv_b - inv_s) / (wb - ws)
        ms = [inv_b + slope * (w - wb) for w in wt]
        lines.append(f"| {fmt} decode ms/token (1 thread, CPU time) | "
                     f"{inv_s:.2f} | {inv_b:.2f} | {slope:.4f} | "
                     f"{ms[0]:.0f} ({1e3 / ms[0]:.1f} tok/s) | {ms[1]:.0f} "
                     f"({1e3 / ms[1]:.1f} tok/s) |")
  size = {f: big[f]["bytes"] / fb["bytes"] for f in big if "bytes" in big[f]}
  gib = lambda f, n: size[f] * n * 4 / 2**30
  lines += ["", "File size at 1B / 2B parameters (the measured size "
            "ratios times 4 bytes a parameter): " + ", ".join(
                f"{f} {gib(f, 1e9):.2f} / {gib(f, 2e9):.2f} GiB"
                for f in ("float", "int8", "int8_dynamic", "int4_block32")
                if f in size) + ".", ""]
  return "\n".join(lines) + "\n"


def _table(cfg, a, rows, threads, ref) -> str:
  fl = rows.get("float", {})
  lines = [
      "# On-device LM: prefill + decode .tflite per weight format",
      "",
      f"`python bench/lm.py --size {a.size}` on {platform.machine()}, "
      f"{os.cpu_count()} cores (shared with other jobs; times are medians "
      f"of {a.runs} runs), {time.strftime('%Y-%m-%d')}.",
      "",
      f"Model: qlite.zoo.gemma_lm, d_model {cfg.d_model}, {cfg.num_layers} "
      f"layers, {cfg.num_heads} query / {cfg.num_kv_heads} kv heads of "
      f"{cfg.head_dim}, MLP {cfg.mlp_dim}, vocab {cfg.vocab}, cache "
      f"{cfg.max_len}, tied embeddings: "
      f"{cfg.param_count() / 1e6:.1f}M parameters, random weights. "
      f"Prefill: {PREFILL_LEN} tokens; decode: {NEW_TOKENS} tokens after "
      f"it; agreement: {NEW_TOKENS} greedy tokens after a {AGREE_PROMPT}-"
      f"token prompt vs JAX float (teacher-forced; free run = tokens "
      f"before the first difference of the format's own greedy run).",
      "",
  ]
  head = ["format", "size MB", "vs float", "export s", "export peak MB"]
  for t in threads:
    head += [f"prefill ms ({t}t)", f"decode tok/s ({t}t)"]
  head += ["1t CPU-time: prefill ms", "decode tok/s", "decode vs float",
           "gen peak MB", "agree", "free run"]
  lines += ["| " + " | ".join(head) + " |",
            "|" + "---|" * len(head)]
  for fmt, r in rows.items():
    if "bytes" not in r:
      lines.append(f"| {fmt} | failed: {r.get('error', '?')} |")
      continue
    cells = [fmt, f"{r['bytes'] / 2**20:.1f}",
             f"{r['bytes'] / fl['bytes']:.3f}" if "bytes" in fl else "-",
             f"{r['export_s']:.1f}", f"{r['export_peak_mb']:.0f}"]
    get = lambda x, k, f: f.format(x[k]) if x and k in x else "-"
    for t in threads:
      x = r.get(t) or r.get(str(t))
      cells += [get(x, "prefill_ms", "{:.1f}"),
                get(x, "decode_tok_s", "{:.1f}")]
    x1 = r.get(threads[0]) or r.get(str(threads[0]))
    f1 = (fl.get(threads[0]) or fl.get(str(threads[0]))) if fl else None
    cells += [get(x1, "prefill_cpu_ms", "{:.1f}"),
              get(x1, "decode_tok_s_cpu", "{:.1f}")]
    cells.append(f"{x1['decode_tok_s_cpu'] / f1['decode_tok_s_cpu']:.2f}x"
                 if x1 and f1 and "decode_tok_s_cpu" in x1 else "-")
    cells += [get(x1, "run_peak_mb", "{:.0f}"), get(x1, "agree", "{:.3f}"),
              get(x1, "free_run", "{}")]
    if "error" in r:
      cells[-1] += f" (failed: {r['error']})"
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Wall-clock columns are medians on a machine shared with "
            "other jobs; the 1-thread CPU-time columns (process CPU time, "
            "what the computation itself took) are the steadier figures "
            "and the decode speed ratio uses them.", "",
            "Export peak MB: peak RSS of the exporting process (model "
            "init, JAX, converter, quantizer; "
            f"{rows.get('float', {}).get('rss_before_mb', float('nan')):.0f}"
            " MB before the export call for float). Gen peak MB: peak RSS "
            "of a LiteRT-only process loading the file and running "
            "prefill + decode (1 thread); full_int8's is one full "
            "forward (logits at all 128 positions, no cache).", ""]
  return "\n".join(lines) + "\n" + NOTES


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.path.insert(0, ROOT)
    kind, *rest = [json.loads(x) for x in sys.argv[2:]]
    fn = {"export": worker_export, "run": worker_run,
          "reference": worker_reference,
          "export_full_int8": worker_export_full_int8,
          "export_full_int8_decode": worker_export_full_int8_decode,
          "run_full_int8_decode": worker_run_full_int8_decode,
          "run_full_int8": worker_run_full_int8}[kind]
    print(json.dumps(fn(*rest)))
  else:
    sys.path.insert(0, ROOT)
    main()
