"""Pallas matmul kernels with quantized weights, and their XLA twins.

* :func:`w8a8_matmul`: int8 activations x int8 weights (or int4 packed two
  a byte, :func:`pack_int4_kn`), int32 accumulation, fused rescale
  ``x_scale[M, 1] * (acc * w_scale)`` -> float32; per K-tile scales
  ``w_scale [T, N]`` and an activation zero point (``zw = zp * sum_k w``)
  are applied inside the kernel too.
* :func:`weight_only_matmul`: float activations x int8 / int4 weights,
  dequantized inside the kernel block by block (never a full float weight)
  to the activation's dtype (bf16 / f16; else f32), float32 accumulation;
  per-channel ``w_scale [1, N]`` or per K-tile ``w_scale [T, N]``.

Each has a ``*_xla`` reference with the same arithmetic. The kernels take
the whole K extent of a ``(block_m, block_n)`` output tile and loop over K
blocks inside (Triton runs grid steps in parallel, so K cannot be a grid
axis), so they need no backend-specific scratch memory. Every load is a
power-of-two block (Triton's rule; :func:`gpu_blocks` picks such blocks and
says when a shape has none).

Which implementation runs: ``impl="auto"`` follows :func:`pallas_mode`
(the ``QLITE_PALLAS`` environment variable: ``auto`` = Pallas on GPU / TPU,
XLA on CPU; ``interpret`` = Pallas in interpret mode on any backend, what
CI uses on CPU; ``off`` = XLA everywhere).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from qlite.errors import QliteError

__all__ = ["w8a8_matmul", "w8a8_matmul_xla", "weight_only_matmul",
           "weight_only_matmul_xla", "dispatch", "pallas_mode", "gpu_blocks",
           "pack_int4_kn", "unpack_int4_kn", "PALLAS_MODES"]

PALLAS_MODES = ("auto", "interpret", "off")
_INT4 = np.dtype(ml_dtypes.int4)


def pallas_mode() -> str:
  """``QLITE_PALLAS``: ``auto`` (default), ``interpret`` or ``off``.

  Raises:
    QliteError: another value (names the variable and the choices).
  """
  v = os.environ.get("QLITE_PALLAS", "auto").strip().lower() or "auto"
  if v not in PALLAS_MODES:
    raise QliteError(f"QLITE_PALLAS={v!r}: expected one of "
                     f"{'|'.join(PALLAS_MODES)} (auto: Pallas kernels on "
                     f"GPU / TPU; interpret: Pallas interpret mode on any "
                     f"backend; off: XLA only)")
  return v


def dispatch(impl: str = "auto") -> str:
  """Returns ``"pallas"``, ``"interpret"`` or ``"xla"``: ``impl`` itself
  unless ``"auto"``, which follows :func:`pallas_mode`: Pallas on GPU /
  TPU and XLA on CPU (``QLITE_PALLAS=auto``), interpret mode
  (``=interpret``) or XLA (``=off``)."""
  if impl != "auto":
    if impl not in ("pallas", "xla", "interpret"):
      raise ValueError(f"impl must be auto, pallas, interpret or xla, got "
                       f"{impl!r}")
    return impl
  mode = pallas_mode()
  if mode == "off":
    return "xla"
  if mode == "interpret":
    return "interpret"
  return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"


def _compiler_params(impl: str, platform: str | None):
  """Triton on GPU (jax's default there is Mosaic GPU, whose copies take at
  most 256 elements a dimension: these kernels read the whole K extent of a
  block); backend defaults elsewhere. ``platform``: lower for this one
  (``"gpu"`` / ``"tpu"``) instead of the default backend (cross-platform
  ``jax.export`` checks)."""
  if impl == "interpret":
    return None
  platform = platform or jax.default_backend()
  if platform in ("gpu", "cuda", "rocm"):
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel
    return pltriton.CompilerParams(num_warps=4, num_stages=2)
  return None


def _block(dim: int, want: int) -> int:
  b = min(want, dim)
  while dim % b:
    b -= 1
  return b


def _pow2_divisor(dim: int, lo: int, hi: int) -> int | None:
  """Largest power of two in ``[lo, hi]`` dividing ``dim``, or None."""
  b = hi
  while b >= lo:
    if dim % b == 0:
      return b
    b //= 2
  return None


def gpu_blocks(m: int, k: int, n: int, *, tile: int | None = None,
               packed: bool = False, max_block_m: int = 64,
               min_block_m: int = 16) -> tuple | None:
  """Returns ``(block_m, block_n, block_k)`` valid on GPU (Triton: every
  load a power of two, dots at least 16 wide) and TPU (Mosaic: lanes of
  128), or None when the shape has none: N a multiple of 128, K a multiple
  of 128 (256 for packed int4: each half of a K block is a dot), a tile
  (``tile``: the K block) a power of two of at least that. M is padded up
  to ``block_m`` (a power of two, ``min_block_m`` .. ``max_block_m``)."""
  bn = _pow2_divisor(n, 128, 128)
  kmin = 256 if packed else 128
  if tile is not None:
    bk = tile if (tile >= kmin and tile & (tile - 1) == 0
                  and k % tile == 0) else None
  else:
    bk = _pow2_divisor(k, kmin, 512)
  if bn is None or bk is None:
    return None
  bm = min_block_m
  while bm < m and bm < max_block_m:
    bm *= 2
  return bm, bn, bk


def pack_int4_kn(w, group: int):
  """int4 values ``w [K, N]`` (any int dtype, values in [-8, 7]) -> int8
  ``[K/2, N]``: in each group of ``group`` rows of K, packed row ``j`` holds
  row ``j`` in its low nibble and row ``j + group/2`` in its high nibble (so
  the kernel's two half-block dots need no interleaving)."""
  k, n = w.shape
  if group % 2 or k % group:
    raise QliteError(f"pack_int4_kn: group {group} must be even and divide "
                     f"K={k}")
  w = jnp.asarray(w).astype(jnp.int32).reshape(k // group, 2, group // 2, n)
  b = (w[:, 0] & 0xF) | (w[:, 1] << 4)
  return b.reshape(k // 2, n).astype(jnp.uint8).view(jnp.int8)


def _unpack(wp):
  """int8 packed rows -> (low nibbles, high nibbles) as int8 (int32 shifts:
  int8 vector shifts are not on every backend)."""
  w = wp.astype(jnp.int32)
  lo = lax.shift_right_arithmetic(lax.shift_left(w, jnp.int32(28)),
                                  jnp.int32(28))
  hi = lax.shift_right_arithmetic(w, jnp.int32(4))
  return lo.astype(jnp.int8), hi.astype(jnp.int8)


def unpack_int4_kn(wp, group: int):
  """Inverse of :func:`pack_int4_kn`: int8 ``[K, N]``."""
  k2, n = wp.shape
  lo, hi = _unpack(wp)
  g2 = group // 2
  return jnp.stack([lo.reshape(-1, g2, n), hi.reshape(-1, g2, n)],
                   axis=1).reshape(2 * k2, n)


def _pad_rows(a, bm: int, value=0):
  m = a.shape[0]
  mp = -(-m // bm) * bm
  if mp == m:
    return a
  return jnp.pad(a, ((0, mp - m), (0, 0)), constant_values=value)


def _as_tiles(w_scale, n):
  w_scale = jnp.asarray(w_scale, jnp.float32)
  return w_scale.reshape(-1, n)


# -- w8a8 --------------------------------------------------------------------
def _w8a8_kernel(x_ref, w_ref, xs_ref, ws_ref, *rest, bk: int, nk: int,
                 tiled: bool, packed: bool, zp: bool):
  o_ref = rest[-1]
  zw_ref = rest[0] if zp else None
  bm, bn = o_ref.shape

  def part(i):
    k0 = pl.multiple_of(i * bk, bk)
    if packed:
      h = bk // 2
      lo, hi = _unpack(w_ref[pl.ds(pl.multiple_of(i * h, h), h), :])
      p = jnp.dot(x_ref[:, pl.ds(k0, h)], lo,
                  preferred_element_type=jnp.int32)
      return p + jnp.dot(x_ref[:, pl.ds(pl.multiple_of(k0 + h, h), h)], hi,
                         preferred_element_type=jnp.int32)
    return jnp.dot(x_ref[:, pl.ds(k0, bk)], w_ref[pl.ds(k0, bk), :],
                   preferred_element_type=jnp.int32)

  if tiled:               # one K block per tile: its scale applied per block
    def body(i, acc):
      p = part(i)
      if zp:
        p = p - zw_ref[pl.ds(i, 1), :]
      return acc + p.astype(jnp.float32) * ws_ref[pl.ds(i, 1), :]
    acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = xs_ref[...] * acc
  else:
    acc = lax.fori_loop(0, nk, lambda i, a: a + part(i),
                        jnp.zeros((bm, bn), jnp.int32))
    if zp:
      acc = acc - zw_ref[...]
    o_ref[...] = xs_ref[...] * (acc.astype(jnp.float32) * ws_ref[...])


def w8a8_matmul_xla(xq, wq, x_scale, w_scale, zw=None, *, packed=False,
                    group=None):
  """XLA reference: ``x_scale * sum_t ((xq @ wq)_t - zw_t) * w_scale_t``
  (int32 products per K tile ``t``, float32 result); ``wq`` packed by
  :func:`pack_int4_kn` when ``packed`` (``group`` its group)."""
  if packed:
    wq = unpack_int4_kn(wq, group)
  k, n = wq.shape
  ws = _as_tiles(w_scale, n)
  xs = jnp.asarray(x_scale, jnp.float32).reshape(-1, 1)
  t = ws.shape[0]
  if t == 1:
    acc = lax.dot_general(xq, wq.astype(jnp.int8), (((1,), (0,)), ((), ())),
                          preferred_element_type=jnp.int32)
    if zw is not None:
      acc = acc - jnp.asarray(zw, jnp.int32).reshape(1, n)
    return xs * (acc.astype(jnp.float32) * ws)
  acc = jnp.einsum("mtk,tkn->tmn", xq.reshape(xq.shape[0], t, k // t),
                   wq.astype(jnp.int8).reshape(t, k // t, n),
                   preferred_element_type=jnp.int32)
  if zw is not None:
    acc = acc - jnp.asarray(zw, jnp.int32).reshape(t, 1, n)
  y = acc.astype(jnp.float32) * ws[:, None, :]
  out = y[0]
  for i in range(1, t):                  # the kernel's order of the sums
    out = out + y[i]
  return xs * out


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k",
                                             "impl", "packed", "platform"))
def w8a8_matmul(xq, wq, x_scale, w_scale, zw=None, *, block_m: int = 128,
                block_n: int = 128, block_k: int = 256, impl: str = "auto",
                packed: bool = False, platform: str | None = None):
  """Returns float32 ``[M, N]`` = ``x_scale [M,1] * sum_t (int32(xq [M,K] @
  wq [K,N])_t - zw_t) * w_scale_t``.

  Args:
    xq: int8 ``[M, K]``.
    wq: int8 ``[K, N]``, or (``packed``) int8 ``[K/2, N]`` from
      :func:`pack_int4_kn` with ``group = block_k``.
    x_scale: ``[M, 1]`` (or ``[M]``) float.
    w_scale: ``[1, N]`` per channel or ``[T, N]`` per K tile (the K block is
      then the tile, ``K / T``).
    zw: optional int32 ``[T, N]``: ``zero_point * sum over the tile's K of
      wq`` (static-range activations), subtracted from the int32 sums.
    block_m, block_n, block_k: output / K blocks (divisors of M, N, K are
      taken; :func:`gpu_blocks` gives GPU / TPU-valid ones).
    impl: ``auto`` | ``pallas`` | ``interpret`` (Pallas in interpret mode,
      any backend) | ``xla``.
    packed: ``wq`` holds int4 packed two a byte.
    platform: lower the Pallas kernel for ``"gpu"`` (Triton) or ``"tpu"``
      (Mosaic) rather than for the default backend (``jax.export`` checks).
  """
  impl = dispatch(impl)
  n = wq.shape[1]
  ws = _as_tiles(w_scale, n)
  t = ws.shape[0]
  m, k = xq.shape
  tiled = t > 1
  bk = k // t if tiled else _block(k, block_k)
  if impl == "xla":
    return w8a8_matmul_xla(xq, wq, x_scale, ws, zw, packed=packed, group=bk)
  xs = jnp.asarray(x_scale, jnp.float32).reshape(-1, 1)
  bm, bn = block_m, _block(n, block_n)      # M padded up to the block
  if m % bm:                         # pad rows (their scale 1, values 0)
    xq, xs = _pad_rows(xq, bm), _pad_rows(xs, bm, 1.0)
  mp = xq.shape[0]
  args = [xq, wq, xs, ws]
  specs = [pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
           pl.BlockSpec((wq.shape[0], bn), lambda i, j: (0, j)),
           pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
           pl.BlockSpec((t, bn), lambda i, j: (0, j))]
  if zw is not None:
    args.append(jnp.asarray(zw, jnp.int32).reshape(t, n))
    specs.append(pl.BlockSpec((t, bn), lambda i, j: (0, j)))
  out = pl.pallas_call(
      functools.partial(_w8a8_kernel, bk=bk, nk=k // bk, tiled=tiled,
                        packed=packed, zp=zw is not None),
      out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32),
      grid=(mp // bm, n // bn),
      in_specs=specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      interpret=impl == "interpret",
      compiler_params=_compiler_params(impl, platform),
  )(*args)
  return out[:m]


# -- weight-only -------------------------------------------------------------
def _compute_dtype(dtype):
  return dtype if np.dtype(dtype) in (np.dtype(jnp.bfloat16),
                                      np.dtype(jnp.float16)) else jnp.float32


def _wo_kernel(x_ref, w_ref, s_ref, o_ref, *, bk: int, nk: int, tiled: bool,
               packed: bool):
  bm, bn = o_ref.shape
  cdt = _compute_dtype(x_ref.dtype)

  def part(i):
    k0 = pl.multiple_of(i * bk, bk)
    if packed:                                   # in-block int4 dequant
      h = bk // 2
      lo, hi = _unpack(w_ref[pl.ds(pl.multiple_of(i * h, h), h), :])
      xa = x_ref[:, pl.ds(k0, h)].astype(cdt)
      xb = x_ref[:, pl.ds(pl.multiple_of(k0 + h, h), h)].astype(cdt)
      return (jnp.dot(xa, lo.astype(cdt), preferred_element_type=jnp.float32)
              + jnp.dot(xb, hi.astype(cdt),
                        preferred_element_type=jnp.float32))
    x = x_ref[:, pl.ds(k0, bk)].astype(cdt)
    w = w_ref[pl.ds(k0, bk), :].astype(cdt)       # in-block dequant
    return jnp.dot(x, w, preferred_element_type=jnp.float32)

  def body(i, acc):
    p = part(i)
    if tiled:
      p = p * s_ref[pl.ds(i, 1), :]
    return acc + p

  acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc if tiled else acc * s_ref[...]


def weight_only_matmul_xla(x, wq, w_scale, *, packed=False, group=None):
  """XLA reference: ``x @ (wq * w_scale)`` with the scale applied to the
  (per-tile) float products, as the kernel does; products in the
  activation's dtype when it is bf16 / f16 (exact: int8 values are exact
  there), float32 otherwise, float32 accumulation."""
  if packed:
    wq = unpack_int4_kn(wq, group)
  k, n = wq.shape
  w_scale = _as_tiles(w_scale, n)
  t = w_scale.shape[0]
  cdt = _compute_dtype(x.dtype)
  x = x.astype(cdt)
  w = wq.astype(cdt)
  if t == 1:
    return jnp.dot(x, w, preferred_element_type=jnp.float32) * w_scale
  parts = jnp.einsum("mtk,tkn->tmn", x.reshape(x.shape[0], t, k // t),
                     w.reshape(t, k // t, n),
                     preferred_element_type=jnp.float32)
  return jnp.sum(parts * w_scale[:, None, :], axis=0)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k",
                                             "impl", "packed", "platform"))
def weight_only_matmul(x, wq, w_scale, *, block_m: int = 128,
                       block_n: int = 128, block_k: int = 256,
                       impl: str = "auto", packed: bool = False,
                       platform: str | None = None):
  """Returns float32 ``x [M,K] @ dequant(wq [K,N])``; ``wq`` int8 or int4
  (or, ``packed``, int8 ``[K/2, N]`` from :func:`pack_int4_kn` with ``group
  = block_k``); ``w_scale`` ``[1, N]`` (per channel) or ``[T, N]`` (T tiles
  along K; the K block is then the tile). Products in ``x``'s dtype when it
  is bf16 / f16, else float32. ``impl`` and ``platform`` as in
  :func:`w8a8_matmul`."""
  impl = dispatch(impl)
  n = wq.shape[1]
  w_scale = _as_tiles(w_scale, n)
  m, k = x.shape
  t = w_scale.shape[0]
  tiled = t > 1
  bk = k // t if tiled else _block(k, block_k)
  if impl == "xla":
    return weight_only_matmul_xla(x, wq, w_scale, packed=packed, group=bk)
  bm, bn = block_m, _block(n, block_n)      # M padded up to the block
  x = _pad_rows(x, bm) if m % bm else x
  mp = x.shape[0]
  out = pl.pallas_call(
      functools.partial(_wo_kernel, bk=bk, nk=k // bk, tiled=tiled,
                        packed=packed),
      out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32),
      grid=(mp // bm, n // bn),
      in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((wq.shape[0], bn), lambda i, j: (0, j)),
                pl.BlockSpec((t, bn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      interpret=impl == "interpret",
      compiler_params=_compiler_params(impl, platform),
  )(x, wq, w_scale)
  return out[:m]
