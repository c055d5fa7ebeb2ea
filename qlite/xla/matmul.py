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

  - weight-only: with the compiled CPU kernel, the float activation is
    quantized per row to int16 (as many bits as keep the int32 sums exact:
    :func:`qlite.kernels.cpu.int16_act_max`, ~80 dB below the signal at
    K = 2048) and multiplied by the int8 / int4 weight in the kernel.
    Otherwise it is split into two int8 "digits" per row (``x ~= s1 * a1 +
    s2 * a2``, ~16 bits), stacked as rows of one XLA int8 dot. Either way
    the weight stays int8 / int4 in memory.
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
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from qlite.core import numerics
from qlite.core import qtypes as qt_lib
from qlite.core.qarray import QArray
from qlite.kernels import cpu as cpu_kernels

__all__ = ["DotLayout", "dot_layout", "quantized_dot", "quantized_conv",
           "int_path_ok", "split_activation", "PackedWeight", "pack_weight"]

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
  return _act_int_ok(act_qtype)


def _act_int_ok(act_qtype) -> bool:
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


def _unpack_int4_nk(packed):
  """``uint8 [..., K/2]`` packed by :func:`qlite.kernels.cpu.pack_int4_nk`
  -> int8 ``[..., K]`` (shifts on the bytes; XLA's int4 convert is slow)."""
  sh = packed.shape
  b = lax.bitcast_convert_type(packed, jnp.int8).reshape(
      sh[:-1] + (sh[-1] // 32, 32))
  lo = lax.shift_right_arithmetic(lax.shift_left(b, jnp.int8(4)), jnp.int8(4))
  hi = lax.shift_right_arithmetic(b, jnp.int8(4))
  return jnp.concatenate([lo, hi], axis=-1).reshape(sh[:-1] + (sh[-1] * 2,))


def _kernel_ok(b_: int, rows: int, nk: bool, act: str = "int8",
               packed: bool = False) -> bool:
  """The CPU kernel runs this dot only where it measured faster than XLA
  (per instruction-set family and row count: ``cpu_kernels.plan``)."""
  return nk and b_ == 1 and cpu_kernels.available() and \
      cpu_kernels.use_kernel(rows, act, "int4" if packed else "int8")


def _int_dot(a, w, tiles: int, nk: bool = False, packed: bool = False,
             panels=None):
  """int8 ``a [B, M, K]`` (int16 only on the kernel route) x int weight ->
  int32.

  ``w`` is ``[B, K, N]`` (``nk=False``: a QArray's own layout), or ``[B, N,
  K]`` (``nk=True``: a :class:`PackedWeight`), int4 ``[B, N, K/2]`` packed
  when ``packed``. Returns ``[B, M, N]``, or ``[B, T, M, N]`` with ``tiles =
  T > 1`` tiles along K. Small M with an ``[N, K]`` weight runs the compiled
  CPU kernel (:mod:`qlite.kernels.cpu`) when it is built; int4 weights are
  otherwise unpacked to int8 with shifts.
  """
  b_, m, k = a.shape
  act = "int16" if np.dtype(a.dtype) == np.dtype(np.int16) else "int8"
  if panels is not None and act == "int8" and b_ == 1 and \
      m >= cpu_kernels.GEMM_MIN_ROWS_INT8 and cpu_kernels.available() and \
      cpu_kernels.family() == "vnni" and \
      cpu_kernels.use_kernel(m, "int8", "panels"):
    # the VNNI GEMM form on the weight's panels, packed once
    out = cpu_kernels.int8_gemm_panels(a[0], panels[0], w.shape[1], tiles)
    return jnp.swapaxes(out, 0, 1)[None] if tiles > 1 else out[:, 0][None]
  if _kernel_ok(b_, m, nk, act, packed):
    fn = cpu_kernels.int4_dot_nk if packed else cpu_kernels.int8_dot_nk
    out = fn(a[0], w[0], tiles)                       # [M, T, N]
    return jnp.swapaxes(out, 0, 1)[None] if tiles > 1 else out[:, 0][None]
  if packed:
    w = _after(_unpack_int4_nk(w), a)
  n = w.shape[1] if nk else w.shape[-1]
  wc = 2 if nk else 1               # the weight's contracting dim
  if tiles > 1:
    a = a.reshape(b_, m, tiles, k // tiles)
    if nk:
      w = w.reshape(b_, n, tiles, k // tiles)
      # a: (B, M, T, t) ; w: (B, N, T, t) -> (B, T, M, N)
      dn = (((3,), (3,)), ((0, 2), (0, 2)))
    else:
      w = w.reshape(b_, tiles, k // tiles, n)
      # a: (B, M, T, t) ; w: (B, T, t, N) -> (B, T, M, N)
      dn = (((3,), (2,)), ((0, 2), (0, 1)))
  else:
    dn = (((2,), (wc,)), ((0,), (0,)))

  def dot(wi):
    if b_ == 1:   # drop the unit batch dim: keeps XLA on its fast dot route
      d = (((dn[0][0][0] - 1,), (dn[0][1][0] - 1,)),
           (tuple(i - 1 for i in dn[1][0][1:]),
            tuple(i - 1 for i in dn[1][1][1:])))
      return lax.dot_general(a[0], wi[0], d,
                             preferred_element_type=jnp.int32)[None]
    return lax.dot_general(a, wi, dn, preferred_element_type=jnp.int32)

  if not nk and np.dtype(w.dtype) == _INT4 and n % 2 == 0:
    w = _after(w, a)
    packed_n = lax.bitcast_convert_type(
        w.reshape(w.shape[:-1] + (n // 2, 2)), jnp.int8)
    lo = lax.shift_right_arithmetic(lax.shift_left(packed_n, jnp.int8(4)),
                                    jnp.int8(4))
    hi = lax.shift_right_arithmetic(packed_n, jnp.int8(4))
    y = jnp.stack([dot(lo), dot(hi)], axis=-1)
    return y.reshape(y.shape[:-2] + (n,))
  if np.dtype(w.dtype) != np.dtype(np.int8):
    w = _after(w.astype(jnp.int8), a)
  return dot(w)


def _per_row_codes(x, qmax):
  """Symmetric per-row (last axis) codes of ``x`` in ``[-qmax, qmax]`` (as
  float) and their scale ``[..., 1]`` (1 for an all-zero row)."""
  absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  s = jnp.where(absmax > 0, absmax / qmax, 1.0).astype(jnp.float32)
  return jnp.clip(jnp.round(x / s), -qmax, qmax), s


def split_activation(x):
  """Returns ``(digits int8 [B, 2M, K], s1 [B, M, 1], s2 [B, M, 1])`` with
  ``x ~= s1 * digits[:, :M] + s2 * digits[:, M:]`` (per-row scales)."""
  a1, s1 = _per_row_codes(x, 127.0)
  a2, s2 = _per_row_codes(x - a1 * s1, 127.0)
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


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class PackedWeight:
  """A quantized dot weight in the layout the integer path wants.

  Provider-private (built by :func:`pack_weight` from a :class:`QArray` once,
  outside jit): ``data`` is the weight as ``[B, N, K]`` (the dot's batch,
  free and contracting dims, contracting last), int8, or int4 packed two
  values a byte as ``uint8 [B, N, K/2]`` (:func:`qlite.kernels.cpu.
  pack_int4_nk`); ``wscale`` the weight scale as ``[B, 1, N]`` (``[B, T, 1,
  N]`` with T tiles along K). ``scale`` is the QArray's own scale, kept so
  :meth:`to_qarray` rebuilds the original exactly. ``panels``: for int8
  activation dots on an AVX-512 VNNI CPU, the weight's VNNI GEMM panels
  packed once (``uint8 [B, ceil(N/64), 64 K]``,
  :func:`qlite.kernels.cpu.pack_u8_panels`; as many bytes again as an int8
  weight), else None.
  """
  data: Any
  wscale: Any
  scale: Any
  layout: DotLayout
  tiles: int
  packed: bool
  shape: tuple
  qtype: Any
  channel_axes: tuple
  tile_sizes: tuple
  dtype: Any
  panels: Any = None

  def tree_flatten(self):
    return ((self.data, self.wscale, self.scale, self.panels),
            (self.layout, self.tiles, self.packed, self.shape, self.qtype,
             self.channel_axes, self.tile_sizes, self.dtype))

  @classmethod
  def tree_unflatten(cls, aux, children):
    data, wscale, scale, panels = children
    return cls(data, wscale, scale, *aux, panels=panels)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def to_qarray(self) -> QArray:
    """The :class:`QArray` this was packed from (original layout)."""
    lay = self.layout
    w = _unpack_int4_nk(self.data) if self.packed else self.data
    w = jnp.swapaxes(w, 1, 2)                                   # [B, K, N]
    return qarray_from_layout(
        w, lay.w_batch + lay.w_contract + lay.w_free, self)

  def dequantize(self, dtype=None):
    return self.to_qarray().dequantize(dtype)


def qarray_from_layout(w, perm, packed) -> QArray:
  """The :class:`QArray` of a weight stored with its axes in ``perm`` order
  (merged, e.g. ``[B, K, N]``): ``packed`` (a packed weight) gives the
  original shape, scale, qtype and channel / tile layout."""
  w = w.reshape(tuple(packed.shape[d] for d in perm))
  w = jnp.transpose(w, np.argsort(perm))
  storage = qt_lib.get_qtype(packed.qtype).storage_dtype
  return QArray(w.astype(storage), packed.scale, None, packed.qtype,
                packed.channel_axes, packed.tile_sizes, packed.dtype)


def pack_weight(qw: QArray, dimension_numbers, x_ndim: int,
                weight_operand: int, act_int8: bool = False):
  """Returns ``qw`` as a :class:`PackedWeight` for this dot, or ``qw``
  itself when the integer path does not apply (or int4 K / tile lengths are
  not multiples of 64). Run it once, outside jit (a weight-sized transpose).
  ``act_int8``: the dot quantizes its activations to int8 (DRQ / SRQ): on a
  CPU whose kernel family is ``vnni`` the weight's GEMM panels are packed
  too (:attr:`PackedWeight.panels`), once, instead of per call.
  """
  if not isinstance(qw, QArray) or not int_path_ok(qw, None):
    return qw
  lay = dot_layout(dimension_numbers, x_ndim, qw.ndim, weight_operand)
  tiles = _tiles(qw, lay)
  qv = jnp.asarray(qw.qvalue)
  int4 = np.dtype(qv.dtype) == _INT4
  if np.dtype(qv.dtype) not in (_INT4, np.dtype(np.int8)):
    return qw
  w3 = _canonical_weight(qv.astype(jnp.int8), lay)              # [B, K, N]
  b_, k, n = w3.shape
  if int4 and not cpu_kernels.int4_packable(k, k // tiles):
    return qw
  data = jnp.swapaxes(w3, 1, 2)                                 # [B, N, K]
  if int4:
    data = cpu_kernels.pack_int4_nk(data.reshape(b_ * n, k)).reshape(
        b_, n, k // 2)
  data = jax.block_until_ready(jnp.array(data, copy=True))
  panels = None
  if act_int8 and b_ == 1 and _one_device(data) and \
      jax.default_backend() == "cpu" and cpu_kernels.panels_supported() and \
      cpu_kernels.family() == "vnni" and \
      cpu_kernels.panels_packable(k, k // tiles, int4):
    panels = jax.block_until_ready(
        cpu_kernels.pack_u8_panels(data[0], int4)[None])
  return PackedWeight(data, _weight_scale(qw, lay, tiles), qw.scale, lay,
                      tiles, int4, qw.shape, qw.qtype, qw.channel_axes,
                      qw.tile_sizes, qw.dtype, panels=panels)


def _one_device(x) -> bool:
  sharding = getattr(x, "sharding", None)
  return sharding is None or len(sharding.device_set) == 1


def _int_matmul(x3, qw, lay: DotLayout, mode: str, act_scale):
  """Canonical integer path: returns float32 ``[B, M, N]``. ``qw`` is a
  :class:`QArray` or a :class:`PackedWeight`."""
  panels = None
  if isinstance(qw, PackedWeight):
    tiles, w3, ws = qw.tiles, qw.data, qw.wscale
    nk, packed, panels = True, qw.packed, qw.panels
  else:
    tiles = _tiles(qw, lay)
    # A QArray used as is: [B, K, N] (no per-call transpose). No barrier on
    # a plain int8 weight: it made XLA copy it every call.
    w3 = _canonical_weight(jnp.asarray(qw.qvalue), lay)
    ws = _weight_scale(qw, lay, tiles)
    nk, packed = False, False
  b_, m, _ = x3.shape

  def finish(acc, rows):           # acc int32 -> float32 [B, rows, N]
    y = acc.astype(jnp.float32) * ws
    if tiles > 1:
      y = jnp.sum(y, axis=1)
    return y[:, :rows]

  if mode == "weight_only":
    if _kernel_ok(b_, m, nk, "int16", packed):
      # one int16 row per activation row (~80 dB below the signal at K=2048)
      amax = cpu_kernels.int16_act_max(x3.shape[-1] // tiles,
                                       4 if packed else 8)
      a, s = _per_row_codes(x3, float(amax))
      a = a.astype(jnp.int16)
      return s * finish(_int_dot(a, w3, tiles, nk, packed), m)
    # Otherwise two int8 digits per activation row. (A bf16 x bf16 -> f32
    # dot with bf16 digits and the weight converted per call was measured
    # slower at every batch on XLA:CPU -- MLP 4x2048: batch 1 0.24x vs
    # 2.05x f32, 16: 0.99x vs 1.23x, 64: 0.57x vs 0.90x -- and was removed.)
    digits, s1, s2 = split_activation(x3)
    y = finish(_int_dot(digits, w3, tiles, nk, packed), 2 * m)
    return s1 * y[:, :m] + s2 * y[:, m:]
  if mode == "drq":
    a, s = _per_row_codes(x3, 127.0)
    a = a.astype(jnp.int8)
    if m == 1 and not _kernel_ok(b_, m, nk, "int8", packed):
      # a second (zero) row keeps XLA:CPU on its fast route
      a = jnp.concatenate([a, jnp.zeros_like(a)], axis=1)
    return s * finish(_int_dot(a, w3, tiles, nk, packed, panels), m)
  # srq: per-tensor asymmetric codes; a row of ones gives the weight sums.
  scale, zp, qtype = act_scale
  at = qt_lib.get_qtype(qtype)
  q = numerics.quantize_values(x3, jnp.float32(scale), jnp.int32(zp), at)
  q = q.astype(jnp.int8)
  ones = jnp.ones((b_, 1, q.shape[-1]), jnp.int8)
  acc = _int_dot(jnp.concatenate([q, ones], axis=1), w3, tiles, nk, packed,
                 panels)
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
      contracting dim), or a :class:`PackedWeight` from :func:`pack_weight`
      for this dot (the fast layout; what :class:`PtqProvider` passes).
    dimension_numbers: the original dot_general's dimension numbers.
    weight_operand: 0 or 1, the weight's operand position.
    mode: ``"weight_only"``, ``"drq"`` or ``"srq"``.
    act_qtype: activation qtype (DRQ / SRQ).
    act_scale: SRQ only: ``(scale, zero_point, qtype)`` of the activation.
    out_dtype: dtype of the result.
  """
  lay = dot_layout(dimension_numbers, x.ndim, qw.ndim, weight_operand)
  if isinstance(qw, PackedWeight) and (
      qw.layout != lay or (mode != "weight_only" and
                           not _act_int_ok(act_qtype))):
    qw = qw.to_qarray()               # packed for another dot / path
  if isinstance(qw, PackedWeight) or int_path_ok(
      qw, act_qtype if mode != "weight_only" else None):
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
