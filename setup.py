"""Builds the optional qlite CPU kernels (a jax.ffi extension); qlite works
without them (XLA fallback). Metadata lives in pyproject.toml."""
import os

from setuptools import Extension, setup


def _ffi_include():
  try:
    import jaxlib  # the XLA FFI headers ship with jaxlib
  except ImportError:
    return None
  inc = os.path.join(os.path.dirname(jaxlib.__file__), "include")
  return inc if os.path.exists(os.path.join(inc, "xla", "ffi", "api",
                                            "ffi.h")) else None


def _flags(inc):
  # MSVC builds the portable scalar path (the SIMD code is GCC / Clang
  # syntax, guarded by __GNUC__ in the source).
  if os.name == "nt":
    return ["/O2", "/std:c++17", "/W3", "/external:W0", "/external:I" + inc]
  # -Wall (with -Wreturn-type) for qlite's own code; the XLA FFI headers
  # are a system include: their switch-over-enum operator<< functions end
  # without a return, which is theirs to fix. -Wno-maybe-uninitialized:
  # GCC 12's AVX-512 unpack / shuffle intrinsics pass
  # _mm512_undefined_epi32() (a self-initialised variable) as their unused
  # merge operand, reported wherever they are inlined (a header false
  # positive that a diagnostic pragma around our code does not reach).
  return ["-O3", "-std=c++17", "-Wall", "-Wno-maybe-uninitialized",
          "-isystem", inc]


_inc = _ffi_include()
_ext = [] if _inc is None else [Extension(
    "qlite.kernels._cpu_kernels", ["qlite/kernels/cpu_kernels.cc"],
    depends=["qlite/kernels/cpu_kernels_core.h",
             "qlite/kernels/cpu_kernels_avx512.inc",
             "qlite/kernels/cpu_kernels_avx2.inc",
             "qlite/kernels/cpu_kernels_gemm.inc",
             "qlite/kernels/cpu_kernels_neon.h",
             "qlite/kernels/cpu_kernels_neon.inc"],
    include_dirs=["qlite/kernels"], language="c++",
    extra_compile_args=_flags(_inc),
    optional=True)]
setup(ext_modules=_ext)
