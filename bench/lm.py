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
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    logits, c = runner.step("prefill", long_prompt[None], PREFILL_LEN, caches)
    times.append(time.perf_counter() - t0)
  prefill_ms = statistics.median(times) * 1e3
  # decode: NEW_TOKENS steps after the 128-token prefill
  dec = []
  for _ in range(max(1, runs // 2)):
    tok, cc = int(np.argmax(logits)), c
    t0 = time.perf_counter()
    for i in range(NEW_TOKENS):
      lg, cc = runner.step("decode", [[tok]], PREFILL_LEN + i, cc)
      tok = int(np.argmax(lg))
    dec.append(time.perf_counter() - t0)
  tok_s = NEW_TOKENS / statistics.median(dec)
  lf = runner.logits_for(prompt, ref)
  agree = float(np.mean(lf.argmax(-1) == np.asarray(ref)))
  own = runner.generate(prompt, NEW_TOKENS).tokens
  free = next((i for i, (a, b) in enumerate(zip(own, ref)) if a != b),
              NEW_TOKENS)
  return {"prefill_ms": prefill_ms, "decode_tok_s": tok_s,
          "agree": agree, "free_run": free, "rss_before_mb": base,
          "run_peak_mb": _peak_rss_mb()}


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
  a = p.parse_args(argv)
  import numpy as np
  cfg = _config(a.size)
  formats = a.formats.split(",")
  threads = [int(t) for t in a.threads.split(",")]
  prompt = [int(t) for t in np.random.default_rng(2).integers(
      0, cfg.vocab, AGREE_PROMPT)]
  print(f"config: {cfg}  ({cfg.param_count() / 1e6:.1f}M params)",
        flush=True)
  ref = _sub(["reference", a.size, prompt])
  print(f"JAX float reference: {ref['s']:.1f} s", flush=True)
  rows = {}
  with tempfile.TemporaryDirectory() as d:
    for fmt in formats:
      path = os.path.join(d, f"{fmt}.tflite")
      try:
        ex = _sub(["export", a.size, fmt, path])
      except RuntimeError as e:
        print(f"{fmt}: export failed: {str(e)[-400:]}", flush=True)
        rows[fmt] = {"error": str(e).strip().splitlines()[-1][:200]}
        continue
      row = dict(ex)
      for t in threads:
        try:
          r = _sub(["run", path, t, prompt, ref["tokens"], a.runs])
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
  head += ["decode vs float (1t)", "gen peak MB", "agree", "free run"]
  lines += ["| " + " | ".join(head) + " |",
            "|" + "---|" * len(head)]
  for fmt, r in rows.items():
    if "bytes" not in r:
      lines.append(f"| {fmt} | failed: {r.get('error', '?')} |")
      continue
    cells = [fmt, f"{r['bytes'] / 2**20:.1f}",
             f"{r['bytes'] / fl['bytes']:.3f}" if "bytes" in fl else "-",
             f"{r['export_s']:.1f}", f"{r['export_peak_mb']:.0f}"]
    for t in threads:
      x = r.get(t) or r.get(str(t))
      cells += ([f"{x['prefill_ms']:.1f}", f"{x['decode_tok_s']:.1f}"]
                if x else ["-", "-"])
    x1 = r.get(threads[0])
    f1 = fl.get(threads[0]) if fl else None
    cells.append(f"{x1['decode_tok_s'] / f1['decode_tok_s']:.2f}x"
                 if x1 and f1 else "-")
    cells += ([f"{x1['run_peak_mb']:.0f}", f"{x1['agree']:.3f}",
               str(x1['free_run'])] if x1 else ["-", "-", "-"])
    if "error" in r:
      cells[-1] += f" (failed: {r['error']})"
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Export peak MB: peak RSS of the exporting process (model "
            "init, JAX, converter, quantizer; "
            f"{rows.get('float', {}).get('rss_before_mb', float('nan')):.0f}"
            " MB before the export call for float). Gen peak MB: peak RSS "
            "of a LiteRT-only process loading the file and running "
            "prefill + decode (1 thread).", ""]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.path.insert(0, ROOT)
    kind, *rest = [json.loads(x) for x in sys.argv[2:]]
    fn = {"export": worker_export, "run": worker_run,
          "reference": worker_reference}[kind]
    print(json.dumps(fn(*rest)))
  else:
    sys.path.insert(0, ROOT)
    main()
