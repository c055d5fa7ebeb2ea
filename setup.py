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


_inc = _ffi_include()
_ext = [] if _inc is None else [Extension(
    "qlite.kernels._cpu_kernels", ["qlite/kernels/cpu_kernels.cc"],
    depends=["qlite/kernels/cpu_kernels_avx512.inc",
             "qlite/kernels/cpu_kernels_gemm.inc"],
    include_dirs=[_inc], language="c++",
    extra_compile_args=["-O3", "-std=c++17", "-Wno-return-type"],
    optional=True)]
setup(ext_modules=_ext)
