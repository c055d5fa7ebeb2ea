"""Pallas kernels in interpret mode (CPU) against their XLA twins."""

import numpy as np
import jax.numpy as jnp
import ml_dtypes
import pytest

from qlite import kernels


def _data(m, k, n, seed=0, wbits=8):
  rng = np.random.default_rng(seed)
  hi = 127 if wbits == 8 else 7
  xq = rng.integers(-127, 128, (m, k)).astype(np.int8)
  wq = rng.integers(-hi, hi + 1, (k, n)).astype(np.int8)
  xs = rng.uniform(0.01, 0.1, (m, 1)).astype(np.float32)
  ws = rng.uniform(0.01, 0.1, (1, n)).astype(np.float32)
  return xq, wq, xs, ws


@pytest.mark.parametrize("m,k,n", [(2, 512, 256), (64, 256, 384), (8, 96, 40)])
def test_w8a8_bit_exact(m, k, n):
  xq, wq, xs, ws = _data(m, k, n)
  ref = kernels.w8a8_matmul(xq, wq, xs, ws, impl="xla")
  got = kernels.w8a8_matmul(xq, wq, xs, ws, impl="interpret", block_m=32,
                            block_n=128, block_k=128)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  # Integer accumulation itself is exact: unit scales give int32 sums.
  one_m, one_n = np.ones((m, 1), np.float32), np.ones((1, n), np.float32)
  acc = kernels.w8a8_matmul(xq, wq, one_m, one_n, impl="interpret",
                            block_m=32, block_n=128, block_k=64)
  np.testing.assert_array_equal(
      np.asarray(acc), (xq.astype(np.int64) @ wq.astype(np.int64)))


@pytest.mark.parametrize("wdtype", ["int8", "int4"])
@pytest.mark.parametrize("tiles", [1, 4])
def test_weight_only_matches_xla(wdtype, tiles):
  m, k, n = 4, 512, 256
  _, wq, _, _ = _data(m, k, n, seed=1, wbits=8 if wdtype == "int8" else 4)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((m, k)).astype(np.float32)
  ws = rng.uniform(0.01, 0.1, (tiles, n)).astype(np.float32)
  w = jnp.asarray(wq).astype(jnp.int4) if wdtype == "int4" else \
      jnp.asarray(wq)
  ref = kernels.weight_only_matmul(x, w, ws, impl="xla")
  got = kernels.weight_only_matmul(x, w, ws, impl="interpret", block_n=128)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5,
                             atol=2e-5)
  deq = (wq.astype(np.float32).reshape(tiles, k // tiles, n)
         * ws[:, None, :]).reshape(k, n)
  np.testing.assert_allclose(np.asarray(got), x @ deq, rtol=1e-4, atol=1e-4)


def test_dispatch_on_cpu_is_xla():
  assert kernels.dispatch() in ("xla", "pallas")
  import jax
  if jax.default_backend() == "cpu":
    assert kernels.dispatch() == "xla"
  with pytest.raises(ValueError):
    kernels.dispatch("cuda")


# -- compiled CPU kernels (jax.ffi; skipped when the extension is not built) --
from qlite.kernels import cpu as cpu_kernels  # noqa: E402


def _int_ref(a, w, t):
  m, k = a.shape
  n = w.shape[0]
  return (a.astype(np.int64).reshape(m, 1, t, k // t)
          * w.astype(np.int64).reshape(1, n, t, k // t)).sum(-1).transpose(
              0, 2, 1)


def test_pack_int4_nk_layout():
  rng = np.random.default_rng(3)
  w = rng.integers(-8, 8, (3, 128)).astype(np.int8)
  p = np.asarray(cpu_kernels.pack_int4_nk(w))
  assert p.shape == (3, 64) and p.dtype == np.uint8
  lo = ((p.astype(np.int16) & 0xF) ^ 8) - 8
  hi = ((p.astype(np.int16) >> 4) ^ 8) - 8
  np.testing.assert_array_equal(lo.reshape(3, 2, 32), w.reshape(3, 2, 2, 32)
                                [:, :, 0])
  np.testing.assert_array_equal(hi.reshape(3, 2, 32), w.reshape(3, 2, 2, 32)
                                [:, :, 1])


_KERNEL_CASES = [
    (1, 512, 256, 1, 8), (2, 2048, 260, 1, 8), (3, 96, 40, 1, 8),
    (5, 512, 256, 8, 8), (16, 256, 64, 2, 8), (1, 512, 256, 1, 4),
    (2, 1024, 130, 4, 4), (7, 128, 12, 2, 4), (70, 256, 36, 1, 8),
    (13, 192, 20, 3, 8), (64, 512, 64, 2, 4), (9, 256, 8, 1, 4),
    (5, 192, 12, 1, 4), (6, 64, 8, 1, 4),
    # GEMM form (int8 activations from 16 rows, int16 from 128): a 32-byte
    # K tail, partial 64-column panels, row tails, K tiles, int4, and a
    # single panel whose rows are split over the threads
    (17, 96, 70, 1, 8), (40, 256, 130, 4, 8), (33, 512, 100, 2, 4),
    (130, 256, 64, 1, 8), (256, 2048, 40, 1, 8)]


def _kernel_case(m, k, n, t, bits, act_dtype):
  rng = np.random.default_rng(m * k + n + bits)
  hi = 127 if bits == 8 else 7
  if act_dtype == "int16":
    amax = cpu_kernels.int16_act_max(k // t, bits)
    a = rng.integers(-amax, amax + 1, (m, k)).astype(np.int16)
    a[0, : k // t] = amax                       # worst case for overflow
  else:
    a = rng.integers(-128, 128, (m, k)).astype(np.int8)
  w = rng.integers(-hi - 1, hi + 1, (n, k)).astype(np.int8)
  if bits == 8:
    w[0, : k // t] = -128 if act_dtype == "int16" else 127
  return a, w


def _kernel_run(a, w, t, bits):
  import jax
  if bits == 8:
    return jax.jit(lambda a, w: cpu_kernels.int8_dot_nk(a, w, t))(a, w)
  return jax.jit(lambda a, w: cpu_kernels.int4_dot_nk(a, w, t))(
      a, cpu_kernels.pack_int4_nk(w))


@pytest.mark.skipif(not cpu_kernels.available(),
                    reason="qlite CPU kernels not built")
@pytest.mark.parametrize("act_dtype", ["int8", "int16"])
@pytest.mark.parametrize("m,k,n,t,bits", _KERNEL_CASES)
def test_cpu_kernel_exact(m, k, n, t, bits, act_dtype):
  a, w = _kernel_case(m, k, n, t, bits, act_dtype)
  got = _kernel_run(a, w, t, bits)
  np.testing.assert_array_equal(np.asarray(got), _int_ref(a, w, t))


def test_int16_act_max_bounds_the_sum():
  for k_tile in (32, 768, 2048, 4096, 1 << 16):
    for bits in (4, 8):
      amax = cpu_kernels.int16_act_max(k_tile, bits)
      assert k_tile * amax * (1 << (bits - 1)) < 2**31
      assert amax == 32767 or k_tile * (amax + 1) * (1 << (bits - 1)) >= 2**31


_ISA_SCRIPT = """
import json, sys, numpy as np
sys.path.insert(0, {tests!r})
import test_kernels as T
bad = 0
for case in T._KERNEL_CASES:
  for act in ("int8", "int16"):
    a, w = T._kernel_case(*case, act)
    got = np.asarray(T._kernel_run(a, w, case[3], case[4]))
    bad += int(not np.array_equal(got, T._int_ref(a, w, case[3])))
print("mismatches", bad)
print("isa_counts", json.dumps(T.cpu_kernels.isa_counts()))
"""

# Variants read from the environment (once per process, so each runs in a
# subprocess): its environment, the paths that must run (each at least
# once, and no other path), and the CPU feature it needs (cpu_features()).
# Every _KERNEL_CASES shape suits the SIMD paths (K tiles of 32 / 64), so
# scalar runs only when forced.
# (The families themselves, scalar / avx2 / avx512bw ..., are forced
# in-process: test_cpu_kernel_families_exact.)
_ISA_VARIANTS = {
    "vnni16": ({"QLITE_CPU_KERNELS_ISA": "vnni16"}, {"vnni16"}, "vnni"),
    # dot forms only: u8 x s8 for int8 rows (M >= 4, K tile % 64 == 0),
    # the int16 form for the rest
    "dot": ({"QLITE_CPU_KERNELS_ISA": "dot"}, {"vnni16", "vnni_u8"}, "vnni"),
    # the GEMM form from 1 row on, for every case
    "gemm": ({"QLITE_CPU_KERNELS_ISA": "vnni", "QLITE_CPU_KERNELS_GEMM_M": "1"},
             {"gemm"}, "vnni"),
}
@pytest.mark.skipif(not cpu_kernels.available(),
                    reason="qlite CPU kernels not built")
@pytest.mark.parametrize("isa", list(_ISA_VARIANTS))
def test_cpu_kernel_isa_variants_exact(isa):
  """Every instruction-set path (chosen once per process from the
  environment) gives the exact int32 sums, and the kernel's own per-path
  call counts (cpu_kernels.isa_counts) show that the forced path -- and
  only it -- ran for every call."""
  import json
  import os
  import subprocess
  import sys
  env_over, expected, needs = _ISA_VARIANTS[isa]
  if not cpu_kernels.cpu_features().get(needs):
    pytest.skip(f"this CPU lacks {needs!r}, which the {isa!r} path needs")
  env = {k: v for k, v in os.environ.items()
         if k not in ("QLITE_CPU_KERNELS_ISA", "QLITE_CPU_KERNELS_GEMM_M",
                      "QLITE_CPU_KERNELS")}
  env.update(env_over, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-c", _ISA_SCRIPT.format(
          tests=os.path.dirname(__file__))],
      env=env, capture_output=True, text=True, timeout=300, check=True)
  assert "mismatches 0" in out.stdout, out.stdout + out.stderr
  counts = json.loads(out.stdout.split("isa_counts", 1)[1])
  assert sum(counts.values()) == 2 * len(_KERNEL_CASES), counts
  assert {k for k, v in counts.items() if v} == expected, counts


# The path each family takes for int8 / int16 activations on the
# _KERNEL_CASES shapes (the VNNI family picks its sub-path per case).
_FAMILY_PATHS = {
    "scalar": {"scalar"}, "avx2": {"avx2"},
    "avxvnni": {"avxvnni", "avxvnni_u8"},
    "avx512bw": {"bw"}, "vnni": {"vnni16", "vnni_u8", "gemm"},
    "neon": {"neon", "neon_dotprod", "neon_i8mm"},
}


@pytest.mark.skipif(not cpu_kernels.available(),
                    reason="qlite CPU kernels not built")
@pytest.mark.parametrize("fam", cpu_kernels.FAMILIES)
def test_cpu_kernel_families_exact(fam):
  """Every family this CPU supports, forced in-process with use_isa (the
  family is an FFI attribute fixed at trace time), gives the exact int32
  sums of the scalar reference, and only that family's paths ran."""
  if not cpu_kernels.cpu_features().get(fam):
    pytest.skip(f"this CPU lacks the {fam!r} instructions")
  before = cpu_kernels.isa_counts()
  with cpu_kernels.use_isa(fam):
    for case in _KERNEL_CASES:
      for act in ("int8", "int16"):
        a, w = _kernel_case(*case, act)
        got = np.asarray(_kernel_run(a, w, case[3], case[4]))
        np.testing.assert_array_equal(got, _int_ref(a, w, case[3]),
                                      err_msg=f"{fam} {case} {act}")
  after = cpu_kernels.isa_counts()
  ran = {k for k in after if after[k] != before[k]}
  assert sum(after.values()) - sum(before.values()) == 2 * len(_KERNEL_CASES)
  assert ran and ran <= _FAMILY_PATHS[fam], ran


@pytest.mark.skipif(not cpu_kernels.available(),
                    reason="qlite CPU kernels not built")
def test_cpu_kernel_odd_shapes_use_scalar_exactly():
  """K tiles that are not multiples of 32 (int8) take the scalar path in
  every family, still exact."""
  rng = np.random.default_rng(7)
  a = rng.integers(-128, 128, (3, 48)).astype(np.int8)
  w = rng.integers(-128, 128, (10, 48)).astype(np.int8)
  for fam in cpu_kernels.FAMILIES:
    if not cpu_kernels.cpu_features().get(fam):
      continue
    before = cpu_kernels.isa_counts()["scalar"]
    with cpu_kernels.use_isa(fam):
      got = np.asarray(_kernel_run(a, w, 1, 8))
    np.testing.assert_array_equal(got, _int_ref(a, w, 1))
    assert cpu_kernels.isa_counts()["scalar"] == before + 1, fam


def test_use_isa_rejects_unknown_and_unsupported():
  from qlite.errors import QliteError
  with pytest.raises(QliteError, match="unknown CPU kernel family 'sse9'"):
    with cpu_kernels.use_isa("sse9"):
      pass
  if cpu_kernels.available():
    missing = [f for f, ok in cpu_kernels.cpu_features().items()
               if not ok and f in cpu_kernels.FAMILIES]
    if missing:
      with pytest.raises(QliteError, match="does not support"):
        with cpu_kernels.use_isa(missing[0]):
          pass


def test_env_isa_bad_value_is_named(monkeypatch):
  from qlite.errors import QliteError
  if not cpu_kernels.available():
    pytest.skip("qlite CPU kernels not built")
  monkeypatch.setenv("QLITE_CPU_KERNELS_ISA", "avx9000")
  cpu_kernels._env_family.cache_clear()
  try:
    # the old names still work: bw = avx512bw, dot / vnni16 = vnni
    for env, fam in (("bw", "avx512bw"), ("dot", "vnni"), ("avx2", "avx2"),
                     ("avx512bw", "avx512bw"), ("vnni", "vnni"),
                     ("scalar", "scalar")):
      if cpu_kernels.cpu_features().get(fam):
        monkeypatch.setenv("QLITE_CPU_KERNELS_ISA", env)
        cpu_kernels._env_family.cache_clear()
        assert cpu_kernels.family() == fam
        assert cpu_kernels.info()["family_reason"] == \
            f"QLITE_CPU_KERNELS_ISA={env}"
    monkeypatch.setenv("QLITE_CPU_KERNELS_ISA", "avx9000")
    cpu_kernels._env_family.cache_clear()
    with pytest.raises(QliteError, match="QLITE_CPU_KERNELS_ISA='avx9000'"):
      cpu_kernels.family()
  finally:
    monkeypatch.delenv("QLITE_CPU_KERNELS_ISA")
    cpu_kernels._env_family.cache_clear()


def test_plan_follows_the_crossover_table():
  """plan() uses the kernel up to the measured row count of the family and
  XLA above it; a family whose kernel never won sends the dot to XLA."""
  if not cpu_kernels.available():
    pytest.skip("qlite CPU kernels not built")
  for fam, table in cpu_kernels.KERNEL_MAX_ROWS.items():
    for (act, weight), limit in table.items():
      limit = min(limit, cpu_kernels.MAX_M)
      if limit >= 1:
        ok, why = cpu_kernels.plan(limit, act, weight, fam)
        assert ok and fam in why, (fam, act, weight, why)
      ok, why = cpu_kernels.plan(limit + 1, act, weight, fam)
      assert not ok and why.startswith("XLA"), (fam, act, weight, why)


def test_info_reports_family_paths_and_reasons():
  d = cpu_kernels.info()
  assert d["backend"] == "cpu"
  if not d["built"]:
    assert d["family"] is None and "not built" in d["family_reason"]
    return
  assert d["best_family"] in cpu_kernels.FAMILIES
  assert d["cpu_features"][d["best_family"]] is True
  assert len(d["paths"]) == 4
  with cpu_kernels.use_isa("scalar"):
    d = cpu_kernels.info()
  assert d["family"] == "scalar" and d["family_reason"] == "use_isa() override"
  by_kind = {p["kind"]: p for p in d["paths"]}
  lim = cpu_kernels.KERNEL_MAX_ROWS["scalar"][("int8", "int8")]
  p = by_kind["w8a8 int8 weights"]
  if lim <= 0:
    assert p["path"] == "XLA" and "slower than XLA" in p["why"]
  else:
    assert p["kernel_rows"] == (1, lim)
  with cpu_kernels.use_isa("off"):
    d = cpu_kernels.info()
  assert d["family"] is None
  assert all(p["path"] == "XLA" for p in d["paths"])
  text = cpu_kernels.format_info(d)
  assert "family in use: none (XLA only)" in text


@pytest.mark.skipif(not cpu_kernels.available(),
                    reason="qlite CPU kernels not built")
def test_quantized_dot_routes_by_plan():
  """A quantized dot runs the kernel exactly when plan() says so, for the
  family it was traced under, and gives the same int8 result either way."""
  import jax
  from qlite import xla
  from qlite.core import quantize
  from qlite.xla import matmul
  dn = (((1,), (0,)), ((), ()))
  rng = np.random.default_rng(5)
  k, n = 256, 64
  qw = quantize(rng.standard_normal((k, n)).astype(np.float32), "int8",
                channel_axes=(1,), narrow_range=True)
  pw = matmul.pack_weight(qw, dn, 2, 1)
  for fam in ("scalar", cpu_kernels.cpu_isa()):
    limit = cpu_kernels.KERNEL_MAX_ROWS[fam][("int8", "int8")]
    for m in (1, 64):
      x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
      with cpu_kernels.use_isa(fam):
        f = jax.jit(lambda x, w: xla.quantized_dot(
            x, w, dn, 1, mode="drq", act_qtype="int8"))
        before = sum(cpu_kernels.isa_counts().values())
        y = np.asarray(f(x, pw))
      ran = sum(cpu_kernels.isa_counts().values()) - before
      # m == 1 without the kernel pads to 2 rows, which may still fit it
      want = m <= limit or (m == 1 and limit >= 2)
      assert ran == int(want), (fam, m, ran, limit)
      with cpu_kernels.use_isa("off"):
        y_x = np.asarray(jax.jit(lambda x, w: xla.quantized_dot(
            x, w, dn, 1, mode="drq", act_qtype="int8"))(x, pw))
      np.testing.assert_allclose(y, y_x, rtol=1e-5, atol=1e-5)


def test_cli_doctor_prints_the_report(capsys):
  from qlite import cli
  assert cli.main(["doctor"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("qlite CPU kernels: ")
  assert "family in use: " in out
  if cpu_kernels.available():
    fam = cpu_kernels.family()
    assert f"family in use: {fam} (" in out
    assert out.count("weights: ") == 4      # the four dot kinds, one a line
