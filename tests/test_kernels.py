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

# Per variant: its environment, the paths that must run (each at least
# once, and no other path), and the least the CPU must support (cpu_isa()).
# Every _KERNEL_CASES shape suits the SIMD paths (K tiles of 32 / 64), so
# scalar runs only when forced.
_ISA_VARIANTS = {
    "scalar": ({"QLITE_CPU_KERNELS_ISA": "scalar"}, {"scalar"}, "scalar"),
    "bw": ({"QLITE_CPU_KERNELS_ISA": "bw"}, {"bw"}, "bw"),
    "vnni16": ({"QLITE_CPU_KERNELS_ISA": "vnni16"}, {"vnni16"}, "gemm"),
    # dot forms only: u8 x s8 for int8 rows (M >= 4, K tile % 64 == 0),
    # the int16 form for the rest
    "dot": ({"QLITE_CPU_KERNELS_ISA": "dot"}, {"vnni16", "vnni_u8"}, "gemm"),
    # the GEMM form from 1 row on, for every case
    "gemm": ({"QLITE_CPU_KERNELS_GEMM_M": "1"}, {"gemm"}, "gemm"),
    # no override: GEMM from 16 (int8) / 128 (int16) rows, dot forms below
    "default": ({}, {"vnni16", "vnni_u8", "gemm"}, "gemm"),
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
  order = cpu_kernels.ISA_NAMES
  have = cpu_kernels.cpu_isa()
  if order.index(have) < order.index(needs):
    pytest.skip(f"this CPU runs up to the {have!r} path; {isa!r} needs "
                f"{needs!r}")
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
