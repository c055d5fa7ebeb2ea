"""Issue 18: a Gemma-style decoder LM exported as one ``.tflite`` with
``prefill`` + ``decode`` signatures (explicit per-layer KV caches), its
weight formats (float, int8 weight-only, dynamic-range int8, int4 per
channel / blockwise), and generation in LiteRT."""

import subprocess
import sys

import numpy as np
import pytest

import qlite
from qlite.litert import generate as gen_lib
from qlite.litert import signatures as sig_lib
from qlite.zoo import gemma_lm

CFG = gemma_lm.TINY
PREFILL_LEN = 8


def _signatures(cfg=CFG):
  args = gemma_lm.signature_args(cfg, PREFILL_LEN)
  names = gemma_lm.signature_io_names(cfg)
  return {k: (k, args[k]) + names[k] for k in ("prefill", "decode")}


@pytest.fixture(scope="module")
def linen_lm():
  model, variables = gemma_lm.build_linen(CFG, seed=0)
  return model, variables, lambda ids: model.apply(variables, ids)


@pytest.fixture(scope="module")
def nnx_lm():
  model = gemma_lm.build_nnx(CFG, seed=1)
  return model, None, lambda ids: model(ids)


@pytest.fixture(scope="module")
def linen_float(linen_lm):
  model, variables, _ = linen_lm
  return qlite.export_tflite(model, signatures=_signatures(),
                             variables=variables)


def test_signatures_listed_and_run_by_name(linen_float, tmp_path):
  info = qlite.inspect_tflite(linen_float)
  caches = [f"{k}_cache_{i}" for i in range(CFG.num_layers) for k in "kv"]
  assert info.signatures == {
      "prefill": (["tokens", "length"] + caches, ["logits"] + caches),
      "decode": (["tokens", "pos"] + caches, ["logits"] + caches)}
  runner = qlite.TFLiteRunner(linen_float, signature="decode")
  assert runner.input_names == ["tokens", "pos"] + caches
  assert runner.output_names == ["logits"] + caches
  with pytest.raises(qlite.QliteError, match="2 signatures.*signature="):
    qlite.TFLiteRunner(linen_float)
  with pytest.raises(qlite.QliteError, match="no signature 'step'"):
    qlite.TFLiteRunner(linen_float, signature="step")


def test_signatures_share_one_copy_of_the_weights():
  # Two signatures closing over one 256x256 weight: the file holds it once.
  import jax.numpy as jnp
  w = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
  one = sig_lib.export_signatures(
      {"a": (lambda x: (x @ w,), (np.zeros((4, 256), np.float32),))})
  two = sig_lib.export_signatures(
      {"a": (lambda x: (x @ w,), (np.zeros((4, 256), np.float32),)),
       "b": (lambda x, y: (jnp.tanh(x @ w) + y,),
             (np.zeros((1, 256), np.float32),) * 2)})
  assert w.nbytes < len(two) < w.nbytes + 16_384, (len(one), len(two))
  x = np.random.default_rng(1).normal(size=(1, 256)).astype(np.float32)
  (y,) = qlite.TFLiteRunner(two, signature="b").run(x, x)
  np.testing.assert_allclose(y, np.tanh(x @ w) + x, rtol=1e-4, atol=1e-4)


def test_bad_signature_arguments_are_named(linen_lm):
  model, variables, _ = linen_lm
  args = gemma_lm.signature_args(CFG, PREFILL_LEN)["decode"]
  with pytest.raises(qlite.QliteError, match="no method 'step'"):
    qlite.export_tflite(model, signatures={"decode": ("step", args)},
                        variables=variables)
  with pytest.raises(qlite.QliteError, match="rules=None"):
    qlite.export_tflite(model, [qlite.QuantizationRule()],
                        signatures={"decode": ("decode", args)},
                        variables=variables)
  with pytest.raises(qlite.QliteError, match="unknown weight format 'int3'"):
    qlite.export_tflite(model, signatures={"decode": ("decode", args)},
                        variables=variables, weights="int3")
  with pytest.raises(qlite.QliteError,
                     match=r"signature 'decode': decode\(\*example_args\) "
                     r"failed.*expected 4 caches"):
    qlite.export_tflite(model, signatures={"decode": ("decode", args[:3])},
                        variables=variables)
  with pytest.raises(qlite.QliteError, match="must be an identifier"):
    sig_lib.export_signatures({"my sig": ("decode", args)}, model=model,
                              variables=variables)


def _cached_logits_vs_full(blob, full_logits, seed):
  """LiteRT prefill (5 of 8 padded tokens) + decode of the next 15 tokens
  vs the JAX full-sequence forward: max |diff| / max |full|."""
  ids = np.random.default_rng(seed).integers(0, CFG.vocab, (1, 20)) \
      .astype(np.int32)
  full = np.asarray(full_logits(ids))[0]
  runner = gen_lib.LMRunner(blob)
  cached = runner.logits_for(ids[0, :5], ids[0, 5:])     # positions 4..18
  assert cached.shape == (15, CFG.vocab)
  return float(np.abs(cached - full[4:19]).max() / np.abs(full).max())


@pytest.mark.parametrize("which", ["linen", "nnx"])
def test_decode_with_cache_reproduces_full_forward(which, linen_lm, nnx_lm,
                                                   linen_float):
  model, variables, full_logits = linen_lm if which == "linen" else nnx_lm
  blob = linen_float if which == "linen" else qlite.export_tflite(
      model, signatures=_signatures(), variables=variables)
  rel = _cached_logits_vs_full(blob, full_logits, seed=3)
  assert rel <= 1e-4, rel


def test_prompt_longer_than_prefill_is_decoded_on(linen_lm, linen_float):
  # 11 prompt tokens > the static prefill length 8: the last 3 go through
  # decode; the continuation's logits still match the full forward.
  _, _, full_logits = linen_lm
  ids = np.random.default_rng(5).integers(0, CFG.vocab, (1, 16)) \
      .astype(np.int32)
  full = np.asarray(full_logits(ids))[0]
  cached = gen_lib.LMRunner(linen_float).logits_for(ids[0, :11], ids[0, 11:])
  assert np.abs(cached - full[10:15]).max() / np.abs(full).max() <= 1e-4


def _agreement(blob, full_logits, prompt, n=32):
  """Fraction of ``n`` greedy positions where the format's next token
  (teacher-forced on JAX float's greedy continuation) equals JAX's."""
  ref, _ = gemma_lm.greedy_reference(full_logits, prompt, n)
  got = gen_lib.LMRunner(blob).logits_for(prompt, ref).argmax(-1)
  return float(np.mean(got == np.asarray(ref)))


@pytest.mark.parametrize("fmt", ["int8", "int8_dynamic"])
@pytest.mark.parametrize("which", ["linen", "nnx"])
def test_int8_formats_greedy_agree_with_jax_float(fmt, which, linen_lm,
                                                  nnx_lm):
  pytest.importorskip("ai_edge_quantizer",
                      reason="weight formats need the [lm] extra")
  model, variables, full_logits = linen_lm if which == "linen" else nnx_lm
  blob = qlite.export_tflite(model, signatures=_signatures(),
                             variables=variables, weights=fmt)
  info = qlite.inspect_tflite(blob)
  int8_weights = [t for t in info.tensors if t.is_constant and
                  t.dtype == "INT8" and len(t.shape) == 2]
  assert len(int8_weights) >= 7 * CFG.num_layers + 1   # 7 Dense + embedding
  prompt = list(np.random.default_rng(7).integers(0, CFG.vocab, 6))
  agree = _agreement(blob, full_logits, prompt)
  assert agree >= 0.9, agree


@pytest.mark.parametrize("fmt", ["int4", "int4_dynamic", "int4_block32"])
def test_int4_formats_run_and_are_measured(fmt, linen_lm, linen_float):
  pytest.importorskip("ai_edge_quantizer",
                      reason="weight formats need the [lm] extra")
  model, variables, full_logits = linen_lm
  blob = qlite.export_tflite(model, signatures=_signatures(),
                             variables=variables, weights=fmt)
  int8 = qlite.export_tflite(model, signatures=_signatures(),
                             variables=variables, weights="int8_dynamic")
  info = qlite.inspect_tflite(blob)
  assert any(t.dtype == "INT4" and t.is_constant for t in info.tensors)
  assert len(blob) < len(int8) < len(linen_float)
  prompt = list(np.random.default_rng(7).integers(0, CFG.vocab, 6))
  agree = _agreement(blob, full_logits, prompt)
  rel = _cached_logits_vs_full(blob, full_logits, seed=3)
  print(f"{fmt}: {len(blob)} bytes ({len(blob) / len(linen_float):.3f}x "
        f"float), greedy agreement {agree:.3f}, logits rel err {rel:.3g}")
  # Measured (tiny LM): 1.0 agreement, ~5e-2 relative logits error; a
  # broken int4 model (e.g. wrong scales) is at chance (1/256).
  assert agree >= 0.5 and rel < 0.2, (agree, rel)


def test_generate_greedy_and_sampling(linen_lm, linen_float):
  _, _, full_logits = linen_lm
  prompt = [3, 1, 4, 1, 5]
  ref, _ = gemma_lm.greedy_reference(full_logits, prompt, 12)
  runner = gen_lib.LMRunner(linen_float)
  assert runner.generate(prompt, 12).tokens == ref
  assert runner.generate(prompt, 12, temperature=1.0, top_k=1).tokens == ref
  a = runner.generate(prompt, 12, temperature=50.0, seed=4).tokens
  b = runner.generate(prompt, 12, temperature=50.0, seed=4).tokens
  c = runner.generate(prompt, 12, temperature=50.0, seed=5).tokens
  # (the random LM's logits span ~80: a high temperature spreads them)
  assert a == b and a != ref and c != a
  with pytest.raises(qlite.QliteError, match="cache length 64"):
    runner.generate(prompt, 60)
  with pytest.raises(qlite.QliteError, match="outside the vocabulary"):
    runner.generate([CFG.vocab + 1], 2)


def test_generate_cli(linen_lm, linen_float, tmp_path):
  _, _, full_logits = linen_lm
  path = tmp_path / "lm.tflite"
  path.write_bytes(linen_float)
  ref, _ = gemma_lm.greedy_reference(full_logits, [1, 2, 3], 6)
  out = subprocess.run(
      [sys.executable, "-m", "qlite.cli", "generate", str(path),
       "--prompt-ids", "1,2,3", "--max-new-tokens", "6"],
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().splitlines()[-1] == ",".join(map(str, ref))
  bad = subprocess.run(
      [sys.executable, "-m", "qlite.cli", "generate", str(path),
       "--prompt-ids", "1,x"], capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "--prompt-ids" in bad.stderr
  shown = subprocess.run([sys.executable, "-m", "qlite.cli", "inspect",
                          str(path)], capture_output=True, text=True,
                         timeout=300)
  assert "signature decode: (tokens, pos, k_cache_0, v_cache_0" in \
      shown.stdout, shown.stdout


@pytest.mark.slow
def test_full_integer_8x8_for_comparison():
  # qlite's own static int8 export of the full-sequence forward (no cache;
  # the embedding a plain take): full-integer, and its next-token choices
  # agree with JAX float on the greedy continuation.
  import dataclasses
  cfg = dataclasses.replace(CFG, composite_lookup=False)
  model, variables = gemma_lm.build_linen(cfg, seed=0)
  full = lambda ids: model.apply(variables, ids)
  prompt = list(np.random.default_rng(7).integers(0, cfg.vocab, 6))
  ref, _ = gemma_lm.greedy_reference(full, prompt, 32)
  seq = np.asarray([prompt + ref], np.int32)
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, cfg.vocab, (4, seq.shape[1])).astype(np.int32)
             for _ in range(8)]
  rules = [qlite.QuantizationRule()]
  stats = qlite.calibrate(model, rules, batches, variables=variables,
                          progress=False)
  blob = qlite.export_tflite(model, rules, stats, seq, variables=variables)
  assert qlite.inspect_tflite(blob).full_integer
  (y,) = qlite.TFLiteRunner(blob).run(seq)
  got = y[0, len(prompt) - 1:-1].argmax(-1)
  assert np.mean(got == np.asarray(ref)) >= 0.9


@pytest.mark.slow
def test_lm_export_example_runs(tmp_path):
  # examples/lm_export.py (tests/test_examples.py leaves it to this file):
  # trains briefly, exports three formats, prints the comparison table.
  import os
  script = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "examples", "lm_export.py")
  out = subprocess.run(
      [sys.executable, script, "--steps", "40", "--out-dir", str(tmp_path),
       "--formats", "float,int8_dynamic,int4_block32"],
      capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
          if len(line.split()) == 8 and line.split()[0] in
          ("float", "int8_dynamic", "int4_block32")}
  assert set(rows) == {"float", "int8_dynamic", "int4_block32"}
  assert float(rows["float"][2]) == 1.0                    # size vs float
  assert float(rows["int8_dynamic"][2]) < 0.4
  assert float(rows["int4_block32"][2]) < float(rows["int8_dynamic"][2])
  assert abs(float(rows["int8_dynamic"][4])) < 0.05        # bits/byte delta
  for fmt in rows:
    assert (tmp_path / f"lm_{fmt}.tflite").exists()


def test_full_integer_decode_step_with_cache():
  # qlite's static int8 export of the decode step itself (KV caches as
  # int8 tensors inside, float at the interface): full-integer, and
  # teacher-forced decoding after a JAX float prefill agrees with JAX.
  import dataclasses
  cfg = dataclasses.replace(CFG, composite_lookup=False)
  model, variables = gemma_lm.build_linen(cfg, seed=0)
  step = gemma_lm.DecodeStep(cfg)
  step_vars = gemma_lm.step_variables(variables)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(8):
    ids = rng.integers(0, cfg.vocab, (1, PREFILL_LEN)).astype(np.int32)
    pre = model.apply(variables, ids, np.int32(PREFILL_LEN),
                      *cfg.empty_caches(), method="prefill")
    batches.append((rng.integers(0, cfg.vocab, (1, 1)).astype(np.int32),
                    np.int32(PREFILL_LEN)) + tuple(np.asarray(c)
                                                   for c in pre[1:]))
  rules = [qlite.QuantizationRule()]
  stats = qlite.calibrate(step, rules, batches, variables=step_vars,
                          progress=False)
  blob = qlite.export_tflite(step, rules, stats, batches[0],
                             variables=step_vars)
  assert qlite.inspect_tflite(blob).full_integer
  full = lambda ids: model.apply(variables, ids)
  prompt = list(np.random.default_rng(7).integers(0, cfg.vocab, PREFILL_LEN))
  ref, ref_logits = gemma_lm.greedy_reference(full, prompt, 24)
  pre = model.apply(variables, np.asarray([prompt], np.int32),
                    np.int32(PREFILL_LEN), *cfg.empty_caches(),
                    method="prefill")
  caches = [np.asarray(c) for c in pre[1:]]
  runner = qlite.TFLiteRunner(blob)
  got, rel = [int(np.argmax(pre[0]))], []
  for i in range(23):
    out = runner.run(np.asarray([[ref[i]]], np.int32),
                     np.int32(PREFILL_LEN + i), *caches)
    caches = out[1:]
    got.append(int(np.argmax(out[0])))
    rel.append(np.abs(out[0][0] - ref_logits[i + 1]).max() /
               np.abs(ref_logits[i + 1]).max())
  assert np.mean(np.asarray(got) == np.asarray(ref)) >= 0.9
  assert max(rel) < 0.05, max(rel)      # measured ~1e-2
