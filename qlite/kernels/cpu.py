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

**Instruction-set families** (:data:`FAMILIES`): ``scalar`` (portable C++),
``avx2`` (``vpmaddwd``), ``avxvnni`` (256-bit ``vpdpwssd``), ``avx512bw``,
``vnni`` (AVX-512 VNNI: dot forms + GEMM form), ``neon`` (aarch64:
``vmlal`` / ``sdot`` / ``smmla`` by what the CPU has). The family is the
best this CPU supports unless ``QLITE_CPU_KERNELS_ISA`` names one (read once
per process; ``bw`` / ``vnni16`` / ``dot`` are kept: ``bw`` = ``avx512bw``,
``vnni16`` / ``dot`` cap the VNNI family's sub-paths) or :func:`use_isa`
forces one for the dots traced inside it. It travels to the kernel as an FFI
attribute, so jitted functions traced under different families can run side
by side.

**Never slower than XLA** (:func:`plan`): per family, activation kind
(int8, or int16 for weight-only) and weight kind (int8 / int4), the kernel
is used only for the row counts where it measured faster than XLA's own
path on the same dot (:data:`KERNEL_MAX_ROWS`, from ``python
bench/xla_ptq.py --crossover``; ``docs/xla_cpu_paths.md``); otherwise the
caller (``qlite.xla.matmul``) runs XLA. :func:`info` reports the family,
the CPU features, and each path in use with the reason; ``qlite doctor``
prints it. :func:`isa_counts` says which kernel paths ran.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

from qlite.errors import QliteError

__all__ = ["available", "int8_dot_nk", "int4_dot_nk", "pack_int4_nk",
           "int4_packable", "int16_act_max", "isa_counts", "cpu_isa",
           "cpu_features", "family", "use_isa", "plan", "info", "FAMILIES",
           "panels_supported", "pack_u8_panels", "int8_gemm_panels",
           "ISA_NAMES", "KERNEL_MAX_ROWS", "MAX_M"]

# Largest M (activation rows of one dot) routed to the kernel whatever the
# table below says; above it XLA is used.
MAX_M = 4096

# Instruction-set families, in the order of the kernel's `isa` attribute.
FAMILIES = ("scalar", "avx2", "avxvnni", "avx512bw", "vnni", "neon")

# The kernel's paths, in the order of its path codes (isa_counts): scalar;
# AVX-512BW int16 dot; AVX-512 VNNI int16 dot (vpdpwssd); VNNI u8 x s8 dot
# (vpdpbusd, int8 activations); VNNI GEMM form (packed weight panels); AVX2
# int16 dot (vpmaddwd); AVX-VNNI int16 dot (ymm vpdpwssd); NEON (vmlal /
# vmull + vpadal); NEON sdot; NEON smmla (i8mm); AVX-VNNI u8 x s8 dot
# (ymm vpdpbusd, int8 activations from 2 rows, int8 weights).
ISA_NAMES = ("scalar", "bw", "vnni16", "vnni_u8", "gemm", "avx2", "avxvnni",
             "neon", "neon_dotprod", "neon_i8mm", "avxvnni_u8")

# QLITE_CPU_KERNELS_ISA values -> family ("off": kernels off).
_ENV_FAMILY = {"scalar": "scalar", "avx2": "avx2", "avxvnni": "avxvnni",
               "avx512bw": "avx512bw", "bw": "avx512bw", "vnni": "vnni",
               "vnni16": "vnni", "dot": "vnni", "gemm": "vnni",
               "neon": "neon", "off": None}

# Never slower than XLA: per family, (activation, weight) -> the largest
# activation row count M of one dot for which the kernel measured faster
# than XLA's own path on that dot (0: never). Activation "int16" is the
# weight-only route (one int16 row per activation row; XLA's alternative is
# two int8 digit rows), "int8" DRQ / SRQ. Measured with `python
# bench/xla_ptq.py --crossover` (dot-level, layers of the bench MLP and
# transformer block, every family forced in one process, side by side);
# the figures and the run are in docs/xla_cpu_paths.md. A limit is the
# largest measured M at which the kernel won in every repeat (noisy cells
# count as losses); (int8, int4) takes the (int8, int8) limit (XLA's int4
# route unpacks the weight first, so the kernel's margin there is larger).
# neon has no measurement (no Arm machine): conservative guesses for a
# 128-bit dot form (weight-only 4 rows, DRQ 1), to refine on Arm hardware.
KERNEL_MAX_ROWS = {
    "scalar": {("int16", "int8"): 0, ("int16", "int4"): 0,
               ("int8", "int8"): 0, ("int8", "int4"): 0},
    "avx2": {("int16", "int8"): 16, ("int16", "int4"): 4,
             ("int8", "int8"): 2, ("int8", "int4"): 2},
    "avxvnni": {("int16", "int8"): 16, ("int16", "int4"): 16,
                ("int8", "int8"): 1, ("int8", "int4"): 1},
    "avx512bw": {("int16", "int8"): 64, ("int16", "int4"): 64,
                 ("int8", "int8"): 4, ("int8", "int4"): 4},
    "vnni": {("int16", "int8"): MAX_M, ("int16", "int4"): MAX_M,
             ("int8", "int8"): 8, ("int8", "int4"): 8,
             # GEMM form on panels packed once (PackedWeight.panels), from
             # GEMM_MIN_ROWS_INT8 rows
             ("int8", "panels"): 16},
    "neon": {("int16", "int8"): 4, ("int16", "int4"): 4,
             ("int8", "int8"): 1, ("int8", "int4"): 1},
}


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


def _module():
  if not _load():
    raise RuntimeError("qlite CPU kernels are not built")
  from qlite.kernels import _cpu_kernels   # pylint: disable=import-outside-toplevel
  return _cpu_kernels


def available() -> bool:
  """True when the compiled kernels are loaded, the backend is CPU and the
  kernels are not turned off (``QLITE_CPU_KERNELS_ISA=off`` or
  ``use_isa("off")``)."""
  return jax.default_backend() == "cpu" and _load() and family() is not None


def isa_counts() -> dict[str, int]:
  """Kernel calls per path (:data:`ISA_NAMES`) in this process so far.
  Requires the extension (see :func:`available`)."""
  return dict(zip(ISA_NAMES, _module().isa_counts()))


def cpu_isa() -> str:
  """The best family (:data:`FAMILIES`) this CPU supports. Requires the
  extension."""
  return FAMILIES[_module().cpu_isa()]


def cpu_features() -> dict[str, bool]:
  """``{family: supported}`` for every family (plus ``neon_dotprod`` /
  ``neon_i8mm`` on aarch64), read from the CPU at run time. Requires the
  extension."""
  return dict(_module().cpu_features())


def _check_family(name, where):
  if name is not None and name not in FAMILIES:
    raise QliteError(
        f"{where}: unknown CPU kernel family {name!r}; use one of "
        f"{', '.join(FAMILIES)} or 'off'")
  if name is not None and _load() and not cpu_features().get(name, False):
    raise QliteError(
        f"{where}: this CPU does not support the {name!r} kernels (it "
        f"supports {', '.join(f for f, ok in cpu_features().items() if ok and f in FAMILIES)}); "
        f"pick one of those or unset it")


@functools.lru_cache(maxsize=None)
def _env_family() -> tuple[str | None, str]:
  """(family, where it came from) from the environment, read once."""
  e = os.environ.get("QLITE_CPU_KERNELS_ISA")
  if e is None or e == "":
    return (cpu_isa() if _load() else None), "best this CPU supports"
  if e not in _ENV_FAMILY:
    raise QliteError(
        f"QLITE_CPU_KERNELS_ISA={e!r} is not a CPU kernel family; use one "
        f"of {', '.join(sorted(_ENV_FAMILY))}")
  fam = _ENV_FAMILY[e]
  _check_family(fam, f"QLITE_CPU_KERNELS_ISA={e}")
  return fam, f"QLITE_CPU_KERNELS_ISA={e}"


# use_isa() overrides, per thread (tracing runs in the caller's thread).
_LOCAL = threading.local()


def _forced() -> list:
  if not hasattr(_LOCAL, "stack"):
    _LOCAL.stack = []
  return _LOCAL.stack


def family() -> str | None:
  """The kernel family dots traced now use (None: kernels off or not
  built): the innermost :func:`use_isa`, else ``QLITE_CPU_KERNELS_ISA``,
  else the best this CPU supports."""
  if _forced():
    return _forced()[-1]
  if not _load():
    return None
  return _env_family()[0]


@contextlib.contextmanager
def use_isa(name: str | None):
  """Forces the kernel family (:data:`FAMILIES`, or ``"off"`` / None for
  XLA only) for the dots *traced* inside the block (a jitted function keeps
  the family it was traced with). For benchmarks and tests; raises
  :class:`qlite.errors.QliteError` when the CPU lacks the family."""
  name = None if name in (None, "off") else name
  _check_family(name, "use_isa")
  _forced().append(name)
  try:
    yield
  finally:
    _forced().pop()


def plan(m: int, act: str = "int8", weight: str = "int8",
         fam: str | None = None) -> tuple[bool, str]:
  """Whether a dot with ``m`` activation rows (``act`` "int8" or "int16",
  ``weight`` "int8" or "int4") runs the kernel under family ``fam``
  (default: :func:`family`), and why. False means XLA's own path."""
  if fam is None:
    fam = family()
  if fam is None or jax.default_backend() != "cpu" or not _load():
    return False, "kernels off or not built: XLA"
  limit = min(KERNEL_MAX_ROWS[fam].get((act, weight), 0), MAX_M)
  if m <= limit:
    return True, (f"{fam} kernel beats XLA up to {limit} rows "
                  f"({act} act x {weight} weight)")
  return False, (f"XLA: {m} rows > {limit}, where the {fam} kernel stops "
                 f"beating XLA ({act} act x {weight} weight)")


def use_kernel(m: int, act: str = "int8", weight: str = "int8") -> bool:
  """:func:`plan`'s decision alone (called at trace time by
  ``qlite.xla.matmul``)."""
  return plan(m, act, weight)[0]


def info() -> dict:
  """What the CPU kernels do on this machine: ``built``, ``backend``,
  ``cpu_features``, the best family, the ``family`` in use and why, and
  ``paths``: for each (activation, weight) kind the row range that runs
  the kernel and the reason, from :data:`KERNEL_MAX_ROWS`."""
  built = _load()
  out = {"built": built, "backend": jax.default_backend(),
         "cpu_features": cpu_features() if built else {},
         "best_family": cpu_isa() if built else None}
  if not built:
    why = ("QLITE_CPU_KERNELS=0" if os.environ.get("QLITE_CPU_KERNELS") ==
           "0" else "extension not built (pip install -e . builds it)")
    out.update(family=None, family_reason=why, paths=[])
    return out
  fam = family()
  out["family"] = fam
  out["family_reason"] = ("use_isa() override" if _forced() else
                          _env_family()[1])
  paths = []
  for (act, weight) in (("int16", "int8"), ("int16", "int4"),
                        ("int8", "int8"), ("int8", "int4")):
    kind = ("weight-only" if act == "int16" else "w8a8") + \
        f" {weight} weights"
    if fam is None or out["backend"] != "cpu":
      paths.append(dict(kind=kind, kernel_rows=None, path="XLA",
                        why="kernels off" if fam is None else
                        f"backend {out['backend']}: XLA"))
      continue
    limit = min(KERNEL_MAX_ROWS[fam][(act, weight)], MAX_M)
    if limit <= 0:
      paths.append(dict(kind=kind, kernel_rows=None, path="XLA",
                        why=f"the {fam} kernel measured slower than XLA at "
                        "every row count"))
    else:
      paths.append(dict(
          kind=kind, kernel_rows=(1, limit),
          path=f"{fam} kernel for 1-{limit} rows, XLA above",
          why=f"measured crossover of the {fam} kernel vs XLA "
          "(docs/xla_cpu_paths.md)"))
  out["paths"] = paths
  lim = KERNEL_MAX_ROWS.get(fam or "", {}).get(("int8", "panels"), 0)
  rows = (f"{GEMM_MIN_ROWS_INT8} rows" if lim == GEMM_MIN_ROWS_INT8 else
          f"{GEMM_MIN_ROWS_INT8}-{lim} rows")
  out["panels"] = (
      f"w8a8 weights get VNNI GEMM panels packed once "
      f"(PackedWeight.panels); the GEMM form reads them at {rows}"
      if fam == "vnni" and lim >= GEMM_MIN_ROWS_INT8 else None)
  return out


def format_info(d: dict | None = None) -> str:
  """:func:`info` as text (what ``qlite doctor`` prints)."""
  d = info() if d is None else d
  state = ("built" if d["built"] else "turned off" if
           d["family_reason"] == "QLITE_CPU_KERNELS=0" else "not built")
  lines = [f"qlite CPU kernels: {state}",
           f"backend: {d['backend']}"]
  if d["cpu_features"]:
    lines.append("cpu: " + ", ".join(
        f"{k}={'yes' if v else 'no'}" for k, v in d["cpu_features"].items()))
    lines.append(f"best family: {d['best_family']}")
  lines.append(f"family in use: {d['family'] or 'none (XLA only)'} "
               f"({d['family_reason']})")
  for p in d["paths"]:
    lines.append(f"  {p['kind']}: {p['path']} -- {p['why']}")
  if d.get("panels"):
    lines.append(f"  panels: {d['panels']}")
  return "\n".join(lines) + "\n"


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
  _module()
  m, _ = a.shape
  n = w.shape[0]
  fam = family()
  # kernels "off" still lets a direct call run: the best family
  code = FAMILIES.index(fam) if fam is not None else -1
  out = jax.ShapeDtypeStruct((m, tiles, n), jnp.int32)
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
      a, w, tiles=np.int64(tiles), isa=np.int64(code))


def int8_dot_nk(a, w, tiles: int = 1):
  """``int32 [M, T, N]``: per K-tile sums of ``a [M, K] . w int8 [N, K]``;
  ``a`` int16 stays int16 (caller keeps it within :func:`int16_act_max`),
  anything else is cast to int8. Requires :func:`available`."""
  return _call("qlite_i8_dot_nk", _act(a), w, tiles)


def int4_dot_nk(a, w_packed, tiles: int = 1):
  """As :func:`int8_dot_nk` with ``w_packed`` from :func:`pack_int4_nk`."""
  return _call("qlite_i4_dot_nk", _act(a), w_packed, tiles)


# Activation rows from which the VNNI GEMM form runs for int8 activations
# (cpu_kernels.cc GemmMinM; panels packed once serve those dots).
GEMM_MIN_ROWS_INT8 = 16


def panels_supported() -> bool:
  """True when this CPU runs the VNNI GEMM form (AVX-512 VNNI), whose
  weight panels :func:`pack_u8_panels` packs once."""
  return _load() and bool(cpu_features().get("vnni"))


def panels_packable(k: int, tile: int | None = None,
                    int4: bool = False) -> bool:
  """True when a K (and tile) length suits the packed panels (multiples of
  32, of 64 for int4)."""
  q = 64 if int4 else 32
  return k % q == 0 and (tile is None or tile % q == 0)


def pack_u8_panels(w_nk, int4: bool = False) -> jax.Array:
  """The VNNI GEMM form's weight panels, packed once: ``w_nk`` int8 ``[N,
  K]`` (or int4 packed by :func:`pack_int4_nk` as ``uint8 [N, K/2]`` with
  ``int4=True``) -> ``uint8 [ceil(N/64), 64 K]`` (per 64 output columns and
  4-byte group of K: 64 columns x 4 values, ``w + 128``). Requires
  :func:`panels_supported`; runs eagerly (outside jit)."""
  if not panels_supported():
    raise RuntimeError("VNNI panels need a CPU with AVX-512 VNNI")
  w = jnp.asarray(w_nk)
  n = w.shape[0]
  k = w.shape[1] * 2 if int4 else w.shape[1]
  out = jax.ShapeDtypeStruct(((n + 63) // 64, 64 * k), jnp.uint8)
  return jax.ffi.ffi_call("qlite_pack_u8_panels", out)(
      w, int4=np.int64(int(int4)))


def int8_gemm_panels(a, panels, n: int, tiles: int = 1):
  """``int32 [M, T, N]``: per K-tile sums of int8 ``a [M, K]`` times the
  weight whose :func:`pack_u8_panels` are ``panels`` (exact, as
  :func:`int8_dot_nk`), by the VNNI GEMM form without per-call packing."""
  _module()
  a = jnp.asarray(a).astype(jnp.int8)
  m = a.shape[0]
  out = jax.ShapeDtypeStruct((m, tiles, n), jnp.int32)
  return jax.ffi.ffi_call("qlite_i8_gemm_panels", out,
                          vmap_method="sequential")(
      a, panels, tiles=np.int64(tiles))
