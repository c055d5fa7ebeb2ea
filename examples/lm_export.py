"""Train a small character-level LM on qlite's own docs, export it as one
``.tflite`` with ``prefill`` + ``decode`` signatures in each weight format,
and compare the formats in LiteRT.

    python examples/lm_export.py [--steps 300] [--out-dir lm_out]

1. A Gemma-style decoder (``qlite.zoo.gemma_lm``: RMSNorm, grouped-query
   attention, rotary embeddings, gated MLP, tied embeddings; d 128, 2
   layers, byte vocabulary) is trained with Adam on the UTF-8 bytes of
   ``README.md`` and ``docs/*.md`` (the last 10 % held out).
2. ``qlite.export_tflite(model, signatures={"prefill": ..., "decode": ...},
   weights=fmt)`` writes one file per weight format; the KV caches are
   explicit inputs / outputs of both signatures.
3. For each file, LiteRT (XNNPACK, 1 thread) measures: size, held-out
   bits per byte (8 windows of 128 bytes, teacher-forced through prefill +
   decode) vs JAX float,
   greedy agreement with JAX float over 32 new tokens, and tokens/s of a
   32-token generation (CPU time, after a warm-up run);
   then prints a table and a greedy sample of the int8 model.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import qlite
from qlite.litert.generate import LMRunner
from qlite.litert.weight_formats import FORMATS
from qlite.zoo import gemma_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = gemma_lm.LMConfig(vocab=256, d_model=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=32, mlp_dim=384,
                        max_len=192)
SEQ = 64
PREFILL = 32


def corpus() -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) uint8 arrays of the project's markdown docs."""
  paths = [os.path.join(ROOT, "README.md")] + sorted(
      glob.glob(os.path.join(ROOT, "docs", "*.md")))
  data = b"\n\n".join(open(p, "rb").read() for p in paths if
                      os.path.exists(p))
  arr = np.frombuffer(data, np.uint8)
  cut = int(len(arr) * 0.9)
  return arr[:cut], arr[cut:]


def train(steps: int, seed: int = 0):
  """Returns ``(model, variables)`` trained for ``steps`` Adam steps."""
  import optax
  model, variables = gemma_lm.build_linen(CFG, seed=seed)
  # Smaller initial embeddings than the zoo's (std 1): trains faster.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 0.05 if "embed" in jax.tree_util.keystr(p) else x,
      variables)
  tr, _ = corpus()
  opt = optax.adamw(3e-3, weight_decay=0.0)
  state = opt.init(variables)

  def loss_fn(v, batch):
    logits = model.apply(v, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[:, 1:]).mean()

  @jax.jit
  def step(v, s, batch):
    loss, g = jax.value_and_grad(loss_fn)(v, batch)
    upd, s = opt.update(g, s, v)
    return optax.apply_updates(v, upd), s, loss

  rng = np.random.default_rng(seed)
  t0 = time.time()
  for i in range(steps):
    idx = rng.integers(0, len(tr) - SEQ - 1, 16)
    batch = np.stack([tr[j:j + SEQ + 1] for j in idx]).astype(np.int32)
    variables, state, loss = step(variables, state, batch)
    if i % 100 == 0 or i == steps - 1:
      print(f"  step {i:4d}  loss {float(loss):.3f}  "
            f"({time.time() - t0:.0f} s)", flush=True)
  return model, variables


def bits_per_byte(logits: np.ndarray, targets: np.ndarray) -> float:
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return float(-logp[np.arange(len(targets)), targets].mean() / math.log(2))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--out-dir", default="lm_out")
  p.add_argument("--formats", default=",".join(FORMATS))
  a = p.parse_args(argv)
  os.makedirs(a.out_dir, exist_ok=True)
  print(f"training {CFG.param_count() / 1e3:.0f}K-parameter char LM on the "
        f"docs, {a.steps} steps")
  model, variables = train(a.steps)
  _, held = corpus()
  full = lambda ids: model.apply(variables, ids)
  # 8 held-out windows of 16 prompt + 128 scored bytes, spread evenly.
  starts = [i * (len(held) - 144) // 7 for i in range(8)]
  windows = [([int(t) for t in held[s:s + 16]],
              [int(t) for t in held[s + 16:s + 144]]) for s in starts]
  jax_bpb = float(np.mean([bits_per_byte(
      np.asarray(full(np.asarray([p_ + c_], np.int32)))[0, 15:-1],
      np.asarray(c_)) for p_, c_ in windows]))
  prompt = windows[0][0]
  ref, _ = gemma_lm.greedy_reference(full, prompt, 32)

  args = gemma_lm.signature_args(CFG, PREFILL)
  names = gemma_lm.signature_io_names(CFG)
  sigs = {k: (k, args[k]) + names[k] for k in ("prefill", "decode")}
  rows, sizes, samples = [], {}, {}
  for fmt in a.formats.split(","):
    path = os.path.join(a.out_dir, f"lm_{fmt}.tflite")
    t0 = time.time()
    blob = qlite.export_tflite(model, signatures=sigs, variables=variables,
                               weights=fmt, path=path)
    export_s = time.time() - t0
    sizes[fmt] = len(blob)
    runner = LMRunner(blob, num_threads=1)
    bpb = float(np.mean([bits_per_byte(runner.logits_for(p_, c_),
                                       np.asarray(c_))
                         for p_, c_ in windows]))
    agree = float(np.mean(runner.logits_for(prompt, ref).argmax(-1) ==
                          np.asarray(ref)))
    out = runner.generate(prompt, 32).tokens          # warm-up
    t0 = time.process_time()
    out = runner.generate(prompt, 32).tokens
    tok_s = 32 / max(time.process_time() - t0, 1e-9)  # CPU time: steadier
    samples[fmt] = out
    rows.append((fmt, len(blob), bpb, agree, tok_s, export_s))
  print()
  print(f"JAX float: held-out {jax_bpb:.3f} bits/byte (8 windows of 128 "
        f"bytes)")
  print(f"{'format':14s} {'bytes':>9s} {'vs float':>8s} {'bits/byte':>9s} "
        f"{'delta':>7s} {'agree':>6s} {'tok/s':>7s} {'export s':>8s}")
  for fmt, n, bpb, agree, tok_s, ex in rows:
    rel = n / sizes["float"] if "float" in sizes else float("nan")
    print(f"{fmt:14s} {n:9d} {rel:8.3f} {bpb:9.3f} {bpb - jax_bpb:+7.3f} "
          f"{agree:6.3f} {tok_s:7.0f} {ex:8.1f}")
  show = "int8" if "int8" in samples else next(iter(samples))
  text = bytes(prompt + samples[show]).decode("utf-8", errors="replace")
  print(f"\n{show} greedy sample: {text!r}")


if __name__ == "__main__":
  main()
