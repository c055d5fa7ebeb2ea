"""Pallas dispatch for :class:`qlite.xla.PtqProvider` on GPU / TPU.

A quantized ``dot_general`` runs on a Pallas kernel (:mod:`qlite.kernels.
matmul`) when :func:`plan` says so, decided once per traced shape, outside
jit, when the provider prepares its params; the weight is then stored as a
:class:`PallasWeight` (int8 ``[K, N]``, or int4 packed two a byte along K,
scales as ``[T, N]``, and for static-range activations the weight's column
sums) and every call runs the kernel:

* weight-only, bf16 / f16 activations: :func:`weight_only_matmul`, the
  weight dequantized block by block inside the kernel to the activation
  dtype (int8 values are exact there), float32 accumulation;
* weight-only, float32 activations: the activation split per row into two
  int8 digits (as the XLA path does, ~16 bits) and :func:`w8a8_matmul` on
  the ``2M`` rows, the two halves summed: the same int32 products and float
  rescale as the XLA path;
* dynamic range (DRQ): per-row int8 activations, :func:`w8a8_matmul`;
* static range (SRQ): per-tensor int8 activations, :func:`w8a8_matmul`
  with the zero point folded in the kernel (``acc - zp * colsum(w)``).

``QLITE_PALLAS`` (:func:`qlite.kernels.matmul.pallas_mode`): ``auto`` uses
the kernels on GPU / TPU for shapes in :data:`THRESHOLDS` (conservative:
activation rows up to ``max_m``, weights of at least ``min_weight``
elements, where a kernel that reads the int8 / int4 weight once beats
XLA's convert-then-dot; ``bench/device_check.py`` measures the crossover),
XLA elsewhere; ``interpret`` uses them for every eligible dot in Pallas
interpret mode on any backend (CI on CPU); ``off`` never. On a device, each
kernel configuration is first compiled, run and compared with its XLA twin
once (:func:`probe`); one that fails stays on XLA with a warning.

Eligible dots: no dot batch dims, an int8 / int4 symmetric weight (several
contracting dims are merged into K, e.g. an attention output projection
``[H, Dh, D]``; with K tiles only one), int8-or-narrower activations, N a
multiple of 128, K (or the K tile) a power-of-two multiple of 128 (256 for
int4) -- the blocks of :func:`qlite.kernels.matmul.gpu_blocks`. A weight sharded over a mesh along
its output channels (its leading non-contracting dim) runs the kernel on
each device's block of N under ``shard_map`` (all activation rows on every
device: decode-sized M); sharded along K or several dims, it stays on XLA's
SPMD path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qlite.core import numerics
from qlite.core import qtypes as qt_lib
from qlite.core.qarray import QArray
from jax.sharding import NamedSharding, PartitionSpec as P

from qlite.kernels import matmul as kmm
from qlite.xla import matmul as xmm
from qlite.xla import sharding as sharding_lib

__all__ = ["PallasWeight", "plan", "pack", "quantized_dot", "probe",
           "THRESHOLDS", "thresholds"]

_INT4 = np.dtype(ml_dtypes.int4)

# Per backend: the kernels run for dots with at most ``max_m`` activation
# rows and at least ``min_weight`` weight elements. Conservative start
# (memory-bound decode-sized dots); bench/device_check.py prints the
# measured crossover per kernel to set them from.
THRESHOLDS = {
    "gpu": {"max_m": 64, "min_weight": 1 << 20},
    "tpu": {"max_m": 64, "min_weight": 1 << 20},
}


def thresholds(backend: str) -> dict:
  """:data:`THRESHOLDS` of ``backend``, overridden by ``QLITE_PALLAS_MAX_M``
  / ``QLITE_PALLAS_MIN_WEIGHT`` when set."""
  t = dict(THRESHOLDS.get(backend, {"max_m": 0, "min_weight": 1 << 62}))
  for key, env in (("max_m", "QLITE_PALLAS_MAX_M"),
                   ("min_weight", "QLITE_PALLAS_MIN_WEIGHT")):
    if os.environ.get(env):
      t[key] = int(os.environ[env])
  return t


@dataclasses.dataclass(frozen=True)
class Plan:
  """A dot's Pallas configuration: ``kernel`` (``"w8a8"`` or
  ``"weight_only"``), blocks, ``packed`` (int4), ``interpret``, and for a
  weight sharded along its output channels the ``mesh`` and mesh ``axis``
  (the kernel then runs per device under ``shard_map``)."""
  kernel: str
  block_m: int
  block_n: int
  block_k: int
  packed: bool
  interpret: bool
  mesh: Any = None
  axis: Any = None


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class PallasWeight:
  """A quantized dot weight in the Pallas kernels' layout (provider-private,
  built by :func:`pack` outside jit).

  ``data``: int8 ``[K, N]`` or int4 packed as int8 ``[K/2, N]``
  (:func:`qlite.kernels.matmul.pack_int4_kn`, group = ``plan.block_k``);
  ``wscale`` float32 ``[T, N]``; ``wsum`` int32 ``[T, N]`` (column sums per K
  tile, for the SRQ zero point); ``scale`` the QArray's own scale (so
  :meth:`to_qarray` rebuilds it exactly).
  """
  data: Any
  wscale: Any
  wsum: Any
  scale: Any
  layout: xmm.DotLayout
  plan: Plan
  shape: tuple
  qtype: Any
  channel_axes: tuple
  tile_sizes: tuple
  dtype: Any

  def tree_flatten(self):
    return ((self.data, self.wscale, self.wsum, self.scale),
            (self.layout, self.plan, self.shape, self.qtype,
             self.channel_axes, self.tile_sizes, self.dtype))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def to_qarray(self) -> QArray:
    """The :class:`QArray` this was packed from (original layout)."""
    lay = self.layout
    w = kmm.unpack_int4_kn(self.data, self.plan.block_k) if \
        self.plan.packed else self.data                         # [K, N]
    return xmm.qarray_from_layout(w, lay.w_contract + lay.w_free, self)

  def dequantize(self, dtype=None):
    return self.to_qarray().dequantize(dtype)


def _sharded(a) -> bool:
  s = getattr(a, "sharding", None)
  return s is not None and not s.is_fully_replicated and \
      len(s.device_set) > 1


def _n_axis(qv, lay) -> tuple | None:
  """``(mesh, axis, devices)`` when ``qv`` is sharded over its leading free
  (output-channel) dim only -- each device then holds a contiguous block of
  N -- else None. ``()`` when not sharded."""
  if not _sharded(qv):
    return ()
  s = qv.sharding
  if not isinstance(s, NamedSharding):
    return None
  spec = tuple(s.spec) + (None,) * (len(qv.shape) - len(s.spec))
  used = [d for d, e in enumerate(spec) if e is not None]
  if used != [lay.w_free[0]]:
    return None
  axis = spec[used[0]]
  names = axis if isinstance(axis, tuple) else (axis,)
  size = math.prod(s.mesh.shape[a] for a in names)
  return sharding_lib.auto_mesh(s.mesh), axis, size


def plan(qw, dimension_numbers, x_shape, x_dtype, weight_operand: int,
         mode: str, act_qtype) -> Plan | None:
  """Returns the :class:`Plan` for this dot, or None (XLA path): see the
  module docstring for when. ``x_shape`` / ``x_dtype``: the activation's
  (traced) shape and dtype."""
  pm = kmm.pallas_mode()
  if pm == "off" or not isinstance(qw, QArray):
    return None
  backend = jax.default_backend()
  if pm == "auto" and backend not in ("gpu", "tpu"):
    return None
  if not xmm.int_path_ok(qw, act_qtype if mode != "weight_only" else None):
    return None
  qv = qw.qvalue
  if np.dtype(qv.dtype) not in (_INT4, np.dtype(np.int8)):
    return None
  lay = xmm.dot_layout(dimension_numbers, len(x_shape), qw.ndim,
                       weight_operand)
  if not lay.w_free:
    return None
  shard = _n_axis(qv, lay)
  if shard is None:          # sharded along K or several dims: XLA's SPMD
    return None
  tiles = dict(qw.tile_sizes)
  if lay.x_batch or lay.w_batch or (tiles and len(lay.w_contract) != 1):
    return None
  m = math.prod(x_shape[d] for d in lay.x_free)
  k = math.prod(qw.shape[d] for d in lay.w_contract)   # contract dims merged
  n = math.prod(qw.shape[d] for d in lay.w_free)
  tile = tiles.get(lay.w_contract[0])
  packed = np.dtype(qv.dtype) == _INT4
  float_x = np.dtype(x_dtype) in (np.dtype(jnp.bfloat16),
                                  np.dtype(jnp.float16))
  kernel = "weight_only" if mode == "weight_only" and float_x else "w8a8"
  rows = 2 * m if mode == "weight_only" and not float_x else m
  if pm == "auto":
    t = thresholds(backend)
    if m > t["max_m"] or k * n < t["min_weight"]:
      return None
  min_bm = 32 if backend == "tpu" else 16     # int8 sublane tile on TPU
  n_dev = n // shard[2] if shard else n             # per device
  blocks = kmm.gpu_blocks(rows, k, n_dev, tile=tile, packed=packed,
                          min_block_m=min_bm)
  if blocks is None or (shard and n % shard[2]):
    return None
  p = Plan(kernel, *blocks, packed, pm == "interpret",
           *(shard[:2] if shard else ()))
  if not p.interpret and not probe(dataclasses.replace(p, mesh=None,
                                                       axis=None),
                                   rows, k, n_dev, tile, mode == "srq"):
    return None
  return p


@functools.lru_cache(maxsize=None)
def probe(p: Plan, m: int, k: int, n: int, tile: int | None,
          zero_point: bool) -> bool:
  """Compiles and runs plan ``p``'s kernel once on random data of this
  shape (on the device, outside jit) and compares it with its XLA twin;
  False, with a warning naming the kernel and shape, when it fails to
  compile or disagrees -- the dot then stays on XLA. Cached per shape."""
  rng = np.random.default_rng(0)
  t = k // tile if tile else 1
  hi = 7 if p.packed else 127
  w = rng.integers(-hi, hi + 1, (k, n)).astype(np.int8)
  ws = jnp.asarray(rng.uniform(0.5, 1.5, (t, n)).astype(np.float32) / 127)
  wk = kmm.pack_int4_kn(w, p.block_k) if p.packed else jnp.asarray(w)
  kw = dict(block_m=p.block_m, block_n=p.block_n, block_k=p.block_k,
            packed=p.packed)
  try:
    if p.kernel == "weight_only":
      x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
      got = kmm.weight_only_matmul(x, wk, ws, impl="pallas", **kw)
      ref = kmm.weight_only_matmul(x, wk, ws, impl="xla", **kw)
    else:
      x = jnp.asarray(rng.integers(-127, 128, (m, k)).astype(np.int8))
      xs = jnp.asarray(rng.uniform(0.5, 1.5, (m, 1)).astype(np.float32))
      zw = jnp.asarray(3 * w.astype(np.int32).reshape(t, k // t, n).sum(1)
                       ) if zero_point else None
      got = kmm.w8a8_matmul(x, wk, xs, ws, zw, impl="pallas", **kw)
      ref = kmm.w8a8_matmul(x, wk, xs, ws, zw, impl="xla", **kw)
    got, ref = np.asarray(got), np.asarray(ref)
    err = float(np.abs(got - ref).max()) / max(float(np.abs(ref).max()),
                                                1e-30)
    exact = p.kernel == "w8a8" and t == 1
    ok = np.array_equal(got, ref) if exact else err <= 1e-4
    why = f"differs from XLA by {err:.1e} of the range"
  except Exception as e:  # any compile / runtime failure: stay on XLA
    ok, why = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  if not ok:
    warnings.warn(
        f"qlite: the Pallas {p.kernel} kernel (M={m}, K={k}, N={n}, "
        f"{'int4' if p.packed else 'int8'} weights) failed its check on "
        f"{jax.default_backend()}: {why}; those dots run on XLA. Run "
        f"`python bench/device_check.py` and report it; QLITE_PALLAS=off "
        f"silences this", RuntimeWarning, stacklevel=2)
  return bool(ok)


def pack(qw: QArray, dimension_numbers, x_ndim: int, weight_operand: int,
         p: Plan) -> PallasWeight:
  """Returns ``qw`` in the kernels' layout for plan ``p``. Run once,
  outside jit (a weight-sized transpose)."""
  lay = xmm.dot_layout(dimension_numbers, x_ndim, qw.ndim, weight_operand)
  w = jnp.asarray(qw.qvalue).astype(jnp.int8)
  perm = lay.w_contract + lay.w_free
  k = math.prod(qw.shape[d] for d in lay.w_contract)
  w = jnp.transpose(w, perm).reshape(k, -1)                        # [K, N]
  k, n = w.shape
  s = jnp.asarray(qw.scale, jnp.float32)
  ws = jnp.transpose(s, perm).reshape(-1, n)                       # [T, N]
  t = ws.shape[0]
  wsum = jnp.sum(w.astype(jnp.int32).reshape(t, k // t, n), axis=1)
  data = kmm.pack_int4_kn(w, p.block_k) if p.packed else w
  if p.mesh is not None:                 # N blocks stay on their devices
    ns = NamedSharding(p.mesh, P(None, p.axis))
    data, ws, wsum = (jax.device_put(a, ns) for a in (data, ws, wsum))
  data, ws, wsum = jax.block_until_ready(
      (jnp.array(data, copy=True), ws, wsum))
  return PallasWeight(data, ws, wsum, qw.scale, lay, p, qw.shape, qw.qtype,
                      qw.channel_axes, qw.tile_sizes, qw.dtype)


def quantized_dot(x, pw: PallasWeight, dimension_numbers, weight_operand: int,
                  *, mode: str, act_qtype=None, act_scale=None,
                  out_dtype=jnp.float32):
  """``dot_general`` of activation ``x`` and a :class:`PallasWeight` on the
  Pallas kernels (arguments as :func:`qlite.xla.matmul.quantized_dot`).
  A weight packed for another dot's layout falls back to that function."""
  lay = xmm.dot_layout(dimension_numbers, x.ndim, pw.ndim, weight_operand)
  p = pw.plan
  if lay != pw.layout:
    return xmm.quantized_dot(x, pw.to_qarray(), dimension_numbers,
                             weight_operand, mode=mode, act_qtype=act_qtype,
                             act_scale=act_scale, out_dtype=out_dtype)
  impl = "interpret" if p.interpret else "pallas"
  kw = dict(block_m=p.block_m, block_n=p.block_n, block_k=p.block_k,
            impl=impl, packed=p.packed)
  x2 = xmm._canonical_x(x, lay)[0]                               # [M, K]
  m = x2.shape[0]
  zp = jnp.int32(0)
  if p.kernel == "weight_only":
    def kernel(xin, xs, zp, data, ws, wsum):
      return kmm.weight_only_matmul(xin, data, ws, **kw)
    xin, xs = x2, jnp.zeros((m, 1), jnp.float32)
  else:
    def kernel(xin, xs, zp, data, ws, wsum):
      zw = zp * wsum if mode == "srq" else None
      return kmm.w8a8_matmul(xin, data, xs, ws, zw, **kw)
    if mode == "weight_only":        # two int8 digits per float32 row
      digits, s1, s2 = xmm.split_activation(x2[None].astype(jnp.float32))
      xin, xs = digits[0], jnp.concatenate([s1[0], s2[0]], axis=0)
    elif mode == "drq":
      a, xs = xmm._per_row_codes(x2.astype(jnp.float32), 127.0)
      xin = a.astype(jnp.int8)
    else:                                                        # srq
      scale, zp, qtype = act_scale
      xin = numerics.quantize_values(
          x2.astype(jnp.float32), jnp.float32(scale), jnp.int32(zp),
          qt_lib.get_qtype(qtype)).astype(jnp.int8)
      xs, zp = jnp.full((m, 1), scale, jnp.float32), jnp.int32(zp)
  if p.mesh is not None:     # each device: all rows x its block of N
    w_spec = P(None, p.axis)
    kernel = jax.shard_map(kernel, mesh=p.mesh,
                           in_specs=(P(), P(), P(), w_spec, w_spec, w_spec),
                           out_specs=w_spec, check_vma=False)
  y = kernel(xin, xs, zp, pw.data, pw.wscale, pw.wsum)
  if p.kernel == "w8a8" and mode == "weight_only":
    y = y[:m] + y[m:]
  return xmm._restore_output(y[None], x.shape, pw.shape, lay).astype(
      out_dtype)
