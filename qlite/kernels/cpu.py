"""Compiled CPU kernels behind ``jax.ffi`` (``qlite/kernels/cpu_kernels.cc``).

Integer matmuls with the weight stored ``[N, K]`` (contracting the last
dims) and int32 accumulation (exact, bit-identical to XLA's int8 dot):

* :func:`int8_dot_nk`: ``a int8|int16 [M, K] x w int8 [N, K] -> int32 [M,
  T, N]``
* :func:`int4_dot_nk`: same with ``w`` int4 packed by :func:`pack_int4_nk`
  (``uint8 [N, K/2]``), nibbles unpacked in registers.

``T`` is the number of tiles along K (sub-channel scales; 1 per channel).
int16 activations serve weight-only dots; :func:`int16_act_max` gives the
largest magnitude whose sums cannot overflow int32. They exist because
XLA:CPU's int8 dot at small M is compute-bound (it repacks the weight every
call: ~1 ms per 2048 x 2048 layer, slower than streaming the f32 weight)
and reaches only ~1.2x f32 at larger M. Below 16 (int8) / 128 (int16)
activation rows the kernel reads every weight byte once per call (a dot
form with horizontal sums); from there on it repacks the weight per call
into 64-column VNNI panels and runs a GEMM form (activations broadcast, no
horizontal sums) at ~4x (int8) / ~2x (int16) f32. Figures and the reasons
for each path: ``docs/xla_cpu_paths.md`` and ``python bench/xla_ptq.py``.

The extension is built by ``pip install -e .`` (``setup.py``); when it is
missing (or the backend is not CPU) :func:`available` is False and callers
use XLA. ``QLITE_CPU_KERNELS=0`` disables it.

The path is chosen per call (CPU features, shape, M);
``QLITE_CPU_KERNELS_ISA=scalar|bw|vnni16|dot`` caps it and
``QLITE_CPU_KERNELS_GEMM_M`` sets the row count from which the GEMM form
runs (both read once per process). :func:`isa_counts` says which paths ran,
:func:`cpu_isa` what the CPU supports.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["available", "int8_dot_nk", "int4_dot_nk", "pack_int4_nk",
           "int4_packable", "int16_act_max", "isa_counts", "cpu_isa",
           "ISA_NAMES", "MAX_M"]

# Largest M (activation rows of one dot) routed to the kernel; above it XLA
# (YNNPACK) is used. The GEMM form keeps the same per-row cost at any M
# (the `python bench/xla_ptq.py` micro table has M = 1, 64 and 512).
MAX_M = 4096


@functools.lru_cache(maxsize=None)
def _load() -> bool:
  if os.environ.get("QLITE_CPU_KERNELS", "1") == "0":
    return False
  try:
    from qlite.kernels import _cpu_kernels   # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  for name, capsule in _cpu_kernels.targets().items():
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
  return True


def available() -> bool:
  """True when the compiled kernels are loaded and the backend is CPU."""
  return jax.default_backend() == "cpu" and _load()


# The kernel's paths, in the order of its Isa() codes: scalar, AVX-512BW
# int16 dot, AVX-512 VNNI int16 dot (vpdpwssd), VNNI u8 x s8 dot (vpdpbusd,
# int8 activations), VNNI GEMM form (packed weight panels).
ISA_NAMES = ("scalar", "bw", "vnni16", "vnni_u8", "gemm")


def isa_counts() -> dict[str, int]:
  """Kernel calls per path (:data:`ISA_NAMES`) in this process so far.
  Requires the extension (see :func:`available`)."""
  if not _load():
    raise RuntimeError("qlite CPU kernels are not built")
  from qlite.kernels import _cpu_kernels   # pylint: disable=import-outside-toplevel
  return dict(zip(ISA_NAMES, _cpu_kernels.isa_counts()))


def cpu_isa() -> str:
  """The best path this CPU supports: ``"scalar"``, ``"bw"`` (AVX-512BW,
  no VNNI) or ``"gemm"`` (AVX-512 VNNI: every path). Requires the
  extension."""
  if not _load():
    raise RuntimeError("qlite CPU kernels are not built")
  from qlite.kernels import _cpu_kernels   # pylint: disable=import-outside-toplevel
  return ISA_NAMES[_cpu_kernels.cpu_isa()]


def int4_packable(k: int, tile: int | None = None) -> bool:
  """True when a K (and tile) length fits the packed-int4 kernel (multiples
  of 64)."""
  return k % 64 == 0 and (tile is None or tile % 64 == 0)


def pack_int4_nk(w_nk) -> jax.Array:
  """Packs int4 values ``[N, K]`` (any int dtype, values in [-8, 7]; K a
  multiple of 64) as ``uint8 [N, K/2]``: per 64-value block along K, byte
  ``i`` holds value ``i`` (low nibble) and value ``i + 32`` (high nibble)."""
  w = jnp.asarray(w_nk).astype(jnp.int8).astype(jnp.uint8)
  n, k = w.shape
  if k % 64:
    raise ValueError(f"pack_int4_nk: K={k} is not a multiple of 64")
  w = w.reshape(n, k // 64, 2, 32)
  lo, hi = w[:, :, 0] & 0xF, w[:, :, 1] & 0xF
  return (lo | (hi << 4)).astype(jnp.uint8).reshape(n, k // 2)


def int16_act_max(k_tile: int, weight_bits: int = 8) -> int:
  """Largest int16 activation magnitude for which a K-tile sum of
  ``a * w`` cannot overflow int32 (``k_tile * amax * wmax < 2**31``)."""
  wmax = 1 << (weight_bits - 1)
  return int(min(32767, (2**31 - 1) // (k_tile * wmax)))


def _act(a):
  a = jnp.asarray(a)
  return a if a.dtype == jnp.int16 else a.astype(jnp.int8)


def _call(target, a, w, tiles: int):
  m, k = a.shape
  n = w.shape[0]
  out = jax.ShapeDtypeStruct((m, tiles, n), jnp.int32)
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
      a, w, tiles=np.int64(tiles))


def int8_dot_nk(a, w, tiles: int = 1):
  """``int32 [M, T, N]``: per K-tile sums of ``a [M, K] . w int8 [N, K]``;
  ``a`` int16 stays int16 (caller keeps it within :func:`int16_act_max`),
  anything else is cast to int8. Requires :func:`available`."""
  if not _load():
    raise RuntimeError("qlite CPU kernels are not built")
  return _call("qlite_i8_dot_nk", _act(a), w, tiles)


def int4_dot_nk(a, w_packed, tiles: int = 1):
  """As :func:`int8_dot_nk` with ``w_packed`` from :func:`pack_int4_nk`."""
  if not _load():
    raise RuntimeError("qlite CPU kernels are not built")
  return _call("qlite_i4_dot_nk", _act(a), w_packed, tiles)
