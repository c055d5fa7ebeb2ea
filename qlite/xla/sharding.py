"""Quantized params on a device mesh (``jax.sharding``).

When a model outgrows one device its params are sharded with
``NamedSharding(mesh, PartitionSpec(...))``. qlite keeps that layout through
quantization:

* :func:`qlite.xla.quantize_params` and :class:`qlite.xla.PtqProvider`
  (float params quantized on the fly) give each :class:`QArray` the
  weight's sharding for ``qvalue``, and for ``scale`` / ``zero_point`` the
  same spec on the axes that keep one scale per index (output channels;
  per-tile scales along a sharded K axis when the tile count divides the
  mesh axis) and ``None`` on the reduced (size-1) axes: :func:`scale_spec`.
* :func:`shard_params` places a params tree (float, quantized or abstract)
  by ``(regex on the "/"-joined path, PartitionSpec)`` rules; on an
  abstract tree (:func:`qlite.xla.abstract_quantized_params`) it sets the
  ``sharding`` of each ``ShapeDtypeStruct`` so
  :func:`qlite.xla.restore_qparams` restores each shard onto its devices.
* :func:`shard_batch` splits a batch along its leading axis over a mesh
  axis: :func:`qlite.calibrate` with ``engine="xla"`` then reduces each
  device's rows where they are and combines the statistics (the same
  statistics as one device: min / max exactly, sums to float rounding).

Every computation then runs under XLA's SPMD partitioner (jit follows the
inputs' shardings). Meshes with ``Explicit`` axes (``jax.make_mesh``'s
default) are used through their ``Auto`` view (:func:`auto_mesh`; the
provider converts its inputs, zero-copy). Multi-host: call ``jax.distributed.initialize()`` in
every process first, build the mesh over ``jax.devices()`` (all hosts), and
pass each process's params / batches as global arrays
(``jax.make_array_from_process_local_data``); see
``docs/xla_accelerators.md``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from qlite.core.qarray import QArray, is_qarray
from qlite.errors import QliteError

__all__ = ["scale_spec", "qarray_sharding", "shard_qarray", "follow",
           "shard_params", "shard_batch", "param_path_specs", "auto_mesh",
           "auto_axes"]


def auto_mesh(mesh: Mesh) -> Mesh:
  """``mesh`` with every axis ``AxisType.Auto`` (same devices and names).

  ``jax.make_mesh`` makes ``Explicit`` axes by default, under which jax
  types every op's output sharding and refuses reshapes that merge sharded
  dims (the canonical ``[M, K] x [K, N]`` form of a quantized dot does);
  qlite lets XLA's partitioner choose instead."""
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def auto_axes(tree):
  """``tree`` with arrays sharded over a mesh with ``Explicit`` axes put on
  its :func:`auto_mesh` view (the same buffers, no copy); other leaves as
  they are."""
  def put(x):
    s = getattr(x, "sharding", None)
    if isinstance(x, jax.Array) and isinstance(s, NamedSharding) and \
        any(t != AxisType.Auto for t in s.mesh.axis_types):
      return jax.device_put(x, NamedSharding(auto_mesh(s.mesh), s.spec))
    return x
  return jax.tree.map(put, tree)


def _axis_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def _padded(spec: P, ndim: int) -> tuple:
  entries = tuple(spec)
  if len(entries) > ndim:
    raise QliteError(f"PartitionSpec {spec} has {len(entries)} entries for "
                     f"an array of rank {ndim}")
  return entries + (None,) * (ndim - len(entries))


def scale_spec(spec: P, shape: Sequence[int], scale_shape: Sequence[int],
               mesh: Mesh) -> P:
  """The spec of a QArray's scale given its weight's ``spec``: each axis
  keeps the weight's entry where the scale has one entry per index (a
  channel axis), or per tile when the tile count divides that mesh axis;
  ``None`` elsewhere (reduced axes of size 1)."""
  out = []
  for d, sd, e in zip(shape, scale_shape, _padded(spec, len(shape))):
    size = _axis_size(mesh, e)
    keep = e is not None and sd > 1 and sd % size == 0 and \
        (sd == d or d % sd == 0)
    out.append(e if keep else None)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def qarray_sharding(q: QArray, weight_sharding: NamedSharding) -> QArray:
  """A QArray whose array leaves are the NamedShardings of ``q``'s arrays
  (``qvalue``: ``weight_sharding``; ``scale`` / ``zero_point``:
  :func:`scale_spec`); usable as jit ``out_shardings`` or for placement."""
  mesh, spec = weight_sharding.mesh, weight_sharding.spec
  ss = NamedSharding(mesh, scale_spec(spec, q.shape, np.shape(q.scale),
                                      mesh))
  return QArray(weight_sharding, ss,
                None if q.zero_point is None else ss, q.qtype,
                q.channel_axes, q.tile_sizes, q.dtype)


def shard_qarray(q: QArray, weight_sharding: NamedSharding) -> QArray:
  """``q`` placed by :func:`qarray_sharding` (``device_put``; arrays that
  already have that sharding are not moved)."""
  s = qarray_sharding(q, weight_sharding)
  return QArray(jax.device_put(q.qvalue, s.qvalue),
                jax.device_put(q.scale, s.scale),
                None if q.zero_point is None else
                jax.device_put(q.zero_point, s.zero_point),
                q.qtype, q.channel_axes, q.tile_sizes, q.dtype)


def follow(q: QArray, *likes) -> QArray:
  """``q`` sharded like the first of ``likes`` (the float weight, an
  abstract placeholder) that has a multi-device ``NamedSharding``; ``q``
  itself when none has."""
  for like in likes:
    s = getattr(like, "sharding", None)
    if isinstance(like, QArray):
      s = getattr(like.qvalue, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh.size > 1:
      return shard_qarray(q, NamedSharding(auto_mesh(s.mesh), s.spec))
  return q


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def param_path_specs(params, rules: Sequence[tuple[str, P]]) -> dict:
  """``{path: PartitionSpec}`` for every leaf (QArrays as one leaf): the
  first rule whose regex ``re.search``-es the ``"/"``-joined path wins;
  unmatched leaves are replicated (``P()``)."""
  compiled = [(re.compile(r), s) for r, s in rules]
  out = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(params,
                                                     is_leaf=is_qarray):
    name = _path_str(path)
    out[name] = next((s for r, s in compiled if r.search(name)), P())
  return out


def shard_params(params, mesh: Mesh, rules: Sequence[tuple[str, P]]):
  """Returns ``params`` placed on ``mesh`` by ``rules``.

  Args:
    params: a params tree: float arrays, :class:`QArray` leaves (the spec is
      the weight's; scales follow :func:`scale_spec`) or an abstract tree
      (``jax.ShapeDtypeStruct`` / placeholder QArrays: the result carries
      ``sharding=`` for :func:`qlite.xla.restore_qparams`).
    mesh: the ``jax.sharding.Mesh``.
    rules: ``(regex, PartitionSpec)`` pairs matched against each leaf's
      ``"/"``-joined path (e.g. ``"params/Dense_0/kernel"``); first match
      wins, unmatched leaves are replicated.

  Raises:
    QliteError: a spec with more entries than the leaf's rank, or a mesh
      axis that does not divide the dimension it shards (names the path).

  Example:
    >>> mesh = jax.make_mesh((2, 4), ("data", "model"))
    >>> params = shard_params(variables, mesh,
    ...                       [(r"kernel$", P("data", "model"))])
  """
  specs = param_path_specs(params, rules)
  mesh = auto_mesh(mesh)

  def place(path, leaf):
    name = _path_str(path)
    spec = specs[name]
    shape = leaf.shape
    try:
      entries = _padded(spec, len(shape))
    except QliteError as e:
      raise QliteError(f"shard_params: {name}: {e}; fix the rule for it"
                       ) from None
    for d, e in zip(shape, entries):
      if d % _axis_size(mesh, e):
        raise QliteError(f"shard_params: {name} has shape {tuple(shape)}: "
                         f"mesh axis {e!r} ({_axis_size(mesh, e)} devices) "
                         f"does not divide {d}; shard another axis or use "
                         f"a mesh whose axis divides it")
    ws = NamedSharding(mesh, spec)
    if is_qarray(leaf):
      if isinstance(leaf.qvalue, jax.ShapeDtypeStruct):
        s = qarray_sharding(leaf, ws)
        sds = lambda a, sh: None if a is None else jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=sh)
        return QArray(sds(leaf.qvalue, s.qvalue), sds(leaf.scale, s.scale),
                      sds(leaf.zero_point, s.zero_point), leaf.qtype,
                      leaf.channel_axes, leaf.tile_sizes, leaf.dtype)
      return shard_qarray(leaf, ws)
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=ws)
    return jax.device_put(leaf, ws)

  return jax.tree_util.tree_map_with_path(place, params, is_leaf=is_qarray)


def shard_batch(batch, mesh: Mesh, axis: str | tuple = "data"):
  """Returns ``batch`` (an array or a tree of arrays) split along its
  leading axis over mesh axis ``axis``, replicated over the others.

  Raises:
    QliteError: a leaf whose leading size the mesh axis does not divide.
  """
  mesh = auto_mesh(mesh)
  size = _axis_size(mesh, axis)
  s = NamedSharding(mesh, P(axis))

  def put(x):
    if np.ndim(x) == 0 or np.shape(x)[0] % size:
      raise QliteError(f"shard_batch: an input of shape {np.shape(x)} does "
                       f"not split over mesh axis {axis!r} ({size} "
                       f"devices): use a batch size divisible by {size}")
    return jax.device_put(x, s)

  return jax.tree.map(put, batch)
