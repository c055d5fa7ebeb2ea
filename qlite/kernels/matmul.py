"""Pallas matmul kernels with quantized weights, and their XLA twins.

* :func:`w8a8_matmul`: int8 activations x int8 weights, int32 accumulation,
  fused rescale ``acc * x_scale[M, 1] * w_scale[1, N]`` -> float32.
* :func:`weight_only_matmul`: float activations x int8 / int4 weights,
  dequantized inside the kernel block by block (never a full float weight),
  per-channel ``w_scale [1, N]`` or per K-tile ``w_scale [T, N]``.

Each has a ``*_xla`` reference with the same arithmetic; :func:`dispatch`
(and ``impl="auto"``) picks Pallas on GPU / TPU and XLA on CPU, where Pallas
only runs in interpret mode. The kernels take the whole K extent of a
``(block_m, block_n)`` output tile and loop over K blocks inside, so they
need no backend-specific scratch memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["w8a8_matmul", "w8a8_matmul_xla", "weight_only_matmul",
           "weight_only_matmul_xla", "dispatch"]


def dispatch(impl: str = "auto") -> str:
  """Returns ``"pallas"`` or ``"xla"``: ``impl`` itself unless ``"auto"``,
  which is Pallas on GPU / TPU and XLA on CPU."""
  if impl != "auto":
    if impl not in ("pallas", "xla", "interpret"):
      raise ValueError(f"impl must be auto, pallas, interpret or xla, got "
                       f"{impl!r}")
    return impl
  return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"


def _block(dim: int, want: int) -> int:
  b = min(want, dim)
  while dim % b:
    b -= 1
  return b


# -- w8a8 --------------------------------------------------------------------
def _w8a8_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, *, bk: int, nk: int):
  bm, bn = o_ref.shape

  def body(i, acc):
    x = x_ref[:, pl.ds(i * bk, bk)]
    w = w_ref[pl.ds(i * bk, bk), :]
    return acc + jnp.dot(x, w, preferred_element_type=jnp.int32)

  acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.int32))
  o_ref[...] = acc.astype(jnp.float32) * xs_ref[...] * ws_ref[...]


def w8a8_matmul_xla(xq, wq, x_scale, w_scale):
  """XLA reference: ``(xq @ wq in int32) * x_scale * w_scale`` (float32)."""
  acc = lax.dot_general(xq, wq, (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * x_scale * w_scale


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k",
                                             "impl"))
def w8a8_matmul(xq, wq, x_scale, w_scale, *, block_m: int = 128,
                block_n: int = 128, block_k: int = 256, impl: str = "auto"):
  """Returns float32 ``[M, N]`` = ``int32(xq [M,K] @ wq [K,N]) * x_scale
  [M,1] * w_scale [1,N]``. ``impl``: ``auto`` | ``pallas`` | ``interpret``
  (Pallas in interpret mode, any backend) | ``xla``."""
  impl = dispatch(impl)
  x_scale = jnp.asarray(x_scale, jnp.float32).reshape(-1, 1)
  w_scale = jnp.asarray(w_scale, jnp.float32).reshape(1, -1)
  if impl == "xla":
    return w8a8_matmul_xla(xq, wq, x_scale, w_scale)
  m, k = xq.shape
  n = wq.shape[1]
  bm, bn, bk = _block(m, block_m), _block(n, block_n), _block(k, block_k)
  return pl.pallas_call(
      functools.partial(_w8a8_kernel, bk=bk, nk=k // bk),
      out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32),
      grid=(m // bm, n // bn),
      in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((k, bn), lambda i, j: (0, j)),
                pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
                pl.BlockSpec((1, bn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      interpret=impl == "interpret",
  )(xq, wq, x_scale, w_scale)


# -- weight-only -------------------------------------------------------------
def _wo_kernel(x_ref, w_ref, s_ref, o_ref, *, bk: int, nk: int, tiled: bool):
  bm, bn = o_ref.shape

  def body(i, acc):
    x = x_ref[:, pl.ds(i * bk, bk)].astype(jnp.float32)
    w = w_ref[pl.ds(i * bk, bk), :].astype(jnp.float32)   # in-block dequant
    part = jnp.dot(x, w, preferred_element_type=jnp.float32)
    if tiled:
      part = part * s_ref[pl.ds(i, 1), :]
    return acc + part

  acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc if tiled else acc * s_ref[...]


def weight_only_matmul_xla(x, wq, w_scale):
  """XLA reference: ``x @ (wq * w_scale)`` with the scale applied to the
  (per-tile) float products, as the kernel does."""
  t = w_scale.shape[0]
  k, n = wq.shape
  x = x.astype(jnp.float32)
  if t == 1:
    return jnp.dot(x, wq.astype(jnp.float32)) * w_scale
  parts = jnp.einsum("mtk,tkn->tmn", x.reshape(x.shape[0], t, k // t),
                     wq.astype(jnp.float32).reshape(t, k // t, n))
  return jnp.sum(parts * w_scale[:, None, :], axis=0)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k",
                                             "impl"))
def weight_only_matmul(x, wq, w_scale, *, block_m: int = 128,
                       block_n: int = 128, block_k: int = 256,
                       impl: str = "auto"):
  """Returns float32 ``x [M,K] @ dequant(wq [K,N])``; ``wq`` int8 or int4;
  ``w_scale`` ``[1, N]`` (per channel) or ``[T, N]`` (T tiles along K; the
  K block is then the tile). ``impl`` as in :func:`w8a8_matmul`."""
  impl = dispatch(impl)
  w_scale = jnp.asarray(w_scale, jnp.float32)
  if w_scale.ndim == 1:
    w_scale = w_scale.reshape(1, -1)
  if impl == "xla":
    return weight_only_matmul_xla(x, wq, w_scale)
  m, k = x.shape
  n = wq.shape[1]
  t = w_scale.shape[0]
  tiled = t > 1
  bm, bn = _block(m, block_m), _block(n, block_n)
  bk = k // t if tiled else _block(k, block_k)
  return pl.pallas_call(
      functools.partial(_wo_kernel, bk=bk, nk=k // bk, tiled=tiled),
      out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32),
      grid=(m // bm, n // bn),
      in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((k, bn), lambda i, j: (0, j)),
                pl.BlockSpec((t, bn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      interpret=impl == "interpret",
  )(x, wq, w_scale)
