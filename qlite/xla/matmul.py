"""Quantized ``dot_general`` / ``conv_general_dilated`` on XLA.

Every quantized dot is brought to a canonical matmul: activation
``[B, M, K]`` times weight ``[B, K, N]`` (``B`` the dot's batch dims, ``M``
the activation's free dims, ``K`` the contracting dims, ``N`` the weight's
free dims), computed, then put back into ``dot_general``'s output layout.

Compute paths (chosen per qtype; measured on XLA:CPU, see
``bench/RESULTS_xla.md``):

* ``int``: int8 x int8 -> int32 ``dot_general``; weight scales (and the
  activation scales) are applied to the int32 output. int4 weights are
  unpacked to int8 with shifts (a bitcast of the packed nibbles), because
  XLA's int4 -> int8 convert and int8 x int4 dots take slow routes. A
  single-row (``M == 1``) dot gets a second row, because XLA:CPU runs
  one-row integer dots through a slow loop.

  - weight-only: the float activation is split into two int8 "digits" per
    row (``x ~= s1 * a1 + s2 * a2``, ~16 bits of precision), stacked as rows
    of one int8 dot: the weight stays int8 in memory and the activation
    error is ~90 dB below the signal.
  - dynamic range (DRQ): per-row symmetric int8 activations computed on the
    fly.
  - static range (SRQ): per-tensor asymmetric int8 activations with the
    calibrated scale / zero point; the zero-point term is the dot of a row
    of ones (the padding row), so no weight sums are stored.
* ``dequant``: fp8, nf4, int16 and asymmetric weights, and convolutions:
  the weight is dequantized (ordered after the layer's input is ready so XLA
  keeps one layer's float weight alive at a time) and the op runs in float;
  DRQ / SRQ activations are fake-quantized (quantize -> dequantize).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from qlite.core import numerics
from qlite.core import qtypes as qt_lib
from qlite.core.qarray import QArray

__all__ = ["DotLayout", "dot_layout", "quantized_dot", "quantized_conv",
           "int_path_ok", "split_activation"]

_INT4 = np.dtype(ml_dtypes.int4)


@dataclasses.dataclass(frozen=True)
class DotLayout:
  """How a ``dot_general`` with a weight operand maps to ``[B,M,K] @ [B,K,N]``.

  Attributes:
    weight_operand: 0 or 1 (which operand of the dot is the weight).
    x_batch, x_free, x_contract: activation dims, in canonical order.
    w_batch, w_contract, w_free: weight dims, in canonical order.
  """
  weight_operand: int
  x_batch: tuple
  x_free: tuple
  x_contract: tuple
  w_batch: tuple
  w_contract: tuple
  w_free: tuple

  @property
  def channel_axes(self) -> tuple:
    """Weight axes that get one scale per index (all non-contracting dims)."""
    return tuple(sorted(self.w_batch + self.w_free))


def dot_layout(dimension_numbers, x_ndim: int, w_ndim: int,
               weight_operand: int) -> DotLayout:
  """Returns the :class:`DotLayout` of a dot_general whose ``weight_operand``
  (0 or 1) is the weight."""
  (lc, rc), (lb, rb) = dimension_numbers
  if weight_operand == 1:
    xc, wc, xb, wb = lc, rc, lb, rb
  else:
    xc, wc, xb, wb = rc, lc, rb, lb
  x_free = tuple(d for d in range(x_ndim) if d not in xc and d not in xb)
  w_free = tuple(d for d in range(w_ndim) if d not in wc and d not in wb)
  return DotLayout(weight_operand, tuple(xb), x_free, tuple(xc), tuple(wb),
                   tuple(wc), w_free)


def int_path_ok(qw: QArray, act_qtype) -> bool:
  """True when the integer path applies: symmetric signed int weights of at
  most 8 bits and (if any) signed int activations of at most 8 bits."""
  qt = qw.qtype
  if not (qt.kind == qt_lib.INT and qt.signed and qt.bits <= 8
          and qw.zero_point is None):
    return False
  if act_qtype is None:
    return True
  at = qt_lib.get_qtype(act_qtype)
  return at.kind == qt_lib.INT and at.signed and at.bits <= 8


def _prod(shape) -> int:
  return int(math.prod(shape))


def _canonical_weight(a, lay: DotLayout):
  """Returns ``a`` (weight-shaped, or its keepdims scale) as ``[B, Kd, N]``."""
  perm = lay.w_batch + lay.w_contract + lay.w_free
  a = jnp.transpose(a, perm) if perm != tuple(range(a.ndim)) else a
  sh = a.shape
  nb, nc = len(lay.w_batch), len(lay.w_contract)
  return a.reshape(_prod(sh[:nb]), _prod(sh[nb:nb + nc]), _prod(sh[nb + nc:]))


def _canonical_x(x, lay: DotLayout):
  perm = lay.x_batch + lay.x_free + lay.x_contract
  x = jnp.transpose(x, perm) if perm != tuple(range(x.ndim)) else x
  sh = x.shape
  nb, nf = len(lay.x_batch), len(lay.x_free)
  return x.reshape(_prod(sh[:nb]), _prod(sh[nb:nb + nf]),
                   _prod(sh[nb + nf:]))


def _restore_output(y, x_shape, w_shape, lay: DotLayout):
  """``[B, M, N]`` -> dot_general's output layout (batch, lhs free, rhs free)."""
  bshape = tuple(x_shape[d] for d in lay.x_batch)
  mshape = tuple(x_shape[d] for d in lay.x_free)
  nshape = tuple(w_shape[d] for d in lay.w_free)
  y = y.reshape(bshape + mshape + nshape)
  if lay.weight_operand == 0:
    nb, nm = len(bshape), len(mshape)
    perm = (tuple(range(nb)) + tuple(range(nb + nm, y.ndim))
            + tuple(range(nb, nb + nm)))
    y = jnp.transpose(y, perm)
  return y


def _after(value, anchor):
  """Returns ``value`` ordered after ``anchor`` is computed (so XLA does not
  hoist per-layer weight work to the start of the program)."""
  value, _ = lax.optimization_barrier((value, anchor))
  return value


def _int_dot(a, w, tiles: int):
  """int8 ``a [B, M, K]`` x int weight ``w [B, K, N]`` -> int32.

  Returns ``[B, M, N]``, or ``[B, T, M, N]`` with ``tiles = T > 1`` tiles
  along K. int4 weights are unpacked from their nibbles with shifts.
  """
  b_, m, k = a.shape
  n = w.shape[-1]
  if tiles > 1:
    a = a.reshape(b_, m, tiles, k // tiles)
    w = w.reshape(b_, tiles, k // tiles, n)
    # a: (B, M, T, t) ; w: (B, T, t, N) -> (B, T, M, N)
    dn = (((3,), (2,)), ((0, 2), (0, 1)))
  else:
    dn = (((2,), (1,)), ((0,), (0,)))

  def dot(wi):
    if b_ == 1:   # drop the unit batch dim: keeps XLA on its fast dot route
      d = (((dn[0][0][0] - 1,), (dn[0][1][0] - 1,)),
           (tuple(i - 1 for i in dn[1][0][1:]),
            tuple(i - 1 for i in dn[1][1][1:])))
      return lax.dot_general(a[0], wi[0], d,
                             preferred_element_type=jnp.int32)[None]
    return lax.dot_general(a, wi, dn, preferred_element_type=jnp.int32)

  if np.dtype(w.dtype) == _INT4 and n % 2 == 0:
    packed = lax.bitcast_convert_type(w.reshape(w.shape[:-1] + (n // 2, 2)),
                                      jnp.int8)
    lo = lax.shift_right_arithmetic(lax.shift_left(packed, jnp.int8(4)),
                                    jnp.int8(4))
    hi = lax.shift_right_arithmetic(packed, jnp.int8(4))
    y = jnp.stack([dot(lo), dot(hi)], axis=-1)
    return y.reshape(y.shape[:-2] + (n,))
  if np.dtype(w.dtype) != np.dtype(np.int8):
    w = w.astype(jnp.int8)
  return dot(w)


def split_activation(x):
  """Returns ``(digits int8 [B, 2M, K], s1 [B, M, 1], s2 [B, M, 1])`` with
  ``x ~= s1 * digits[:, :M] + s2 * digits[:, M:]`` (per-row scales)."""
  absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  s1 = jnp.where(absmax > 0, absmax / 127.0, 1.0).astype(jnp.float32)
  a1 = jnp.clip(jnp.round(x / s1), -127, 127)
  r = x - a1 * s1
  rmax = jnp.max(jnp.abs(r), axis=-1, keepdims=True)
  s2 = jnp.where(rmax > 0, rmax / 127.0, 1.0).astype(jnp.float32)
  a2 = jnp.clip(jnp.round(r / s2), -127, 127)
  digits = jnp.concatenate([a1, a2], axis=1).astype(jnp.int8)
  return digits, s1, s2


def _weight_scale(qw: QArray, lay: DotLayout, tiles: int):
  """Weight scale as ``[B, 1, N]`` (or ``[B, T, 1, N]`` with tiles)."""
  s = _canonical_weight(jnp.asarray(qw.scale), lay)     # [B, T|1, N]
  if tiles > 1:
    return s[:, :, None, :]
  return s


def _tiles(qw: QArray, lay: DotLayout) -> int:
  tiles = dict(qw.tile_sizes)
  if not tiles:
    return 1
  (axis,) = lay.w_contract
  return qw.shape[axis] // tiles[axis]


def _int_matmul(x3, qw: QArray, lay: DotLayout, mode: str, act_scale):
  """Canonical integer path: returns float32 ``[B, M, N]``."""
  tiles = _tiles(qw, lay)
  w3 = _canonical_weight(jnp.asarray(qw.qvalue), lay)
  if np.dtype(w3.dtype) != np.dtype(np.int8):
    # Only where the weight is converted (int4 unpack): a barrier on a plain
    # int8 weight made XLA copy it every call (MLP 4x2048, batch 1:
    # 13.6 ms with, 3.3 ms without; f32 5.3 ms).
    w3 = _after(w3, x3)
  ws = _weight_scale(qw, lay, tiles)
  b_, m, _ = x3.shape

  def finish(acc, rows):           # acc int32 -> float32 [B, rows, N]
    y = acc.astype(jnp.float32) * ws
    if tiles > 1:
      y = jnp.sum(y, axis=1)
    return y[:, :rows]

  if mode == "weight_only":
    digits, s1, s2 = split_activation(x3)
    y = finish(_int_dot(digits, w3, tiles), 2 * m)
    return s1 * y[:, :m] + s2 * y[:, m:]
  if mode == "drq":
    absmax = jnp.max(jnp.abs(x3), axis=-1, keepdims=True)
    s = jnp.where(absmax > 0, absmax / 127.0, 1.0).astype(jnp.float32)
    a = jnp.clip(jnp.round(x3 / s), -127, 127).astype(jnp.int8)
    if m == 1:     # a second (zero) row keeps XLA:CPU on its fast route
      a = jnp.concatenate([a, jnp.zeros_like(a)], axis=1)
    return s * finish(_int_dot(a, w3, tiles), m)
  # srq: per-tensor asymmetric codes; a row of ones gives the weight sums.
  scale, zp, qtype = act_scale
  at = qt_lib.get_qtype(qtype)
  q = numerics.quantize_values(x3, jnp.float32(scale), jnp.int32(zp), at)
  q = q.astype(jnp.int8)
  ones = jnp.ones((b_, 1, q.shape[-1]), jnp.int8)
  acc = _int_dot(jnp.concatenate([q, ones], axis=1), w3, tiles)
  if tiles > 1:
    acc = acc[:, :, :m] - jnp.int32(zp) * acc[:, :, m:]
  else:
    acc = acc[:, :m] - jnp.int32(zp) * acc[:, m:]
  return jnp.float32(scale) * finish(acc, m)


def _fake_quant_act(x, mode: str, act_qtype, act_scale, reduce_axes):
  """Activation quantize -> dequantize in float (dequant path)."""
  if mode == "weight_only":
    return x
  if mode == "drq":
    at = qt_lib.get_qtype(act_qtype)
    absmax = jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True)
    s, _ = numerics.scale_zero_point(-absmax, absmax, at, symmetric=True,
                                     narrow_range=at.kind == qt_lib.INT)
    return numerics.fake_quant(x.astype(jnp.float32), s, None, at,
                               narrow_range=at.kind == qt_lib.INT)
  scale, zp, qtype = act_scale
  return numerics.fake_quant(x.astype(jnp.float32), jnp.float32(scale),
                             jnp.int32(zp), qtype)


def quantized_dot(x, qw: QArray, dimension_numbers, weight_operand: int, *,
                  mode: str, act_qtype=None, act_scale=None,
                  out_dtype=jnp.float32):
  """Returns ``dot_general`` of activation ``x`` and quantized weight ``qw``.

  Args:
    x: float activation.
    qw: the weight as a :class:`QArray` (original shape, per-channel over
      the weight's non-contracting dims, optional tiles along its single
      contracting dim).
    dimension_numbers: the original dot_general's dimension numbers.
    weight_operand: 0 or 1, the weight's operand position.
    mode: ``"weight_only"``, ``"drq"`` or ``"srq"``.
    act_qtype: activation qtype (DRQ / SRQ).
    act_scale: SRQ only: ``(scale, zero_point, qtype)`` of the activation.
    out_dtype: dtype of the result.
  """
  lay = dot_layout(dimension_numbers, x.ndim, qw.ndim, weight_operand)
  if int_path_ok(qw, act_qtype if mode != "weight_only" else None):
    x3 = _canonical_x(x.astype(jnp.float32), lay)
    y = _int_matmul(x3, qw, lay, mode, act_scale)
    return _restore_output(y, x.shape, qw.shape, lay).astype(out_dtype)
  xq = _fake_quant_act(x, mode, act_qtype, act_scale, lay.x_contract)
  w = _after(qw.dequantize(jnp.float32), x)
  args = (w, xq) if weight_operand == 0 else (xq, w)
  y = lax.dot_general(*args, dimension_numbers,
                      preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


def quantized_conv(x, qw: QArray, params: dict, *, mode: str, act_qtype=None,
                   act_scale=None, out_dtype=jnp.float32):
  """Returns ``conv_general_dilated(x, qw, **params)``: dequant path (the
  weight dequantized after ``x`` is ready; DRQ per-tensor / SRQ activations
  fake-quantized)."""
  xq = _fake_quant_act(x, mode, act_qtype, act_scale, tuple(range(x.ndim)))
  w = _after(qw.dequantize(jnp.float32), x)
  p = dict(params)
  p["preferred_element_type"] = None
  y = lax.conv_general_dilated_p.bind(xq.astype(jnp.float32), w, **p)
  return y.astype(out_dtype)
