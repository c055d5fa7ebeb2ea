"""Cross-layer equalization for conv / BatchNorm -> ReLU -> conv chains.

The int8 tensor between two convs has one scale for all its channels: a
channel with a small range uses few of the 255 levels. ReLU is positively
homogeneous (``relu(y / s) = relu(y) / s`` for ``s > 0``), so dividing
channel ``c`` of the first layer's output by ``s_c`` (its BatchNorm's
``scale`` and ``bias``, or its conv kernel and bias) and multiplying the
second conv's weights of input channel ``c`` by ``s_c`` leaves the float
model unchanged:

* into a depthwise conv, every weight belongs to one channel and is
  quantized per channel, so the move is free for the weights:
  ``s_c = r_c / max(r)`` brings every channel to the widest one's range;
* into a regular conv, ``s_c = sqrt(r_c / w_c)`` (``r_c``: the channel's
  activation range, ``w_c``: the largest weight reading it) balances the
  activation's and the weights' ranges.

ReLU6 and other clipping activations are not homogeneous: such chains are
left alone. Each move is checked on a calibration batch (the float outputs
must stay the same) and undone otherwise.
"""

from __future__ import annotations

import numpy as np

from qlite.metrics import sqnr_db
from qlite.ptq import _graph
from qlite.ptq.smoothquant import _param_names
from qlite.trace.graph import Lit

DEAD = 1e-3          # channels below this fraction of the widest: untouched
MIN_SCALE = 1.0 / 64  # the most a channel's range grows


def _is_relu(graph, node) -> int | None:
  """The input var of ``max(u, 0)``, or None."""
  if node is None or node.name != "max" or len(node.inputs) != 2:
    return None
  for i, a in enumerate(node.inputs):
    if isinstance(a, Lit) and np.all(np.asarray(a.value) == 0):
      return node.inputs[1 - i]
  return None


def _in_channel_axis(layer, channels: int):
  """(axis of the second conv's kernel that reads input channel c, depthwise)."""
  node = layer.node
  if node.name != "conv_general_dilated" or layer.weight_operand != 1:
    return None
  dn = node.params["dimension_numbers"]
  out_ax, in_ax = int(dn.rhs_spec[0]), int(dn.rhs_spec[1])
  fgc = int(node.params.get("feature_group_count", 1))
  if fgc == 1:
    return in_ax, False
  return (out_ax, True) if fgc == channels else None


def _candidates(graph, layers, leaves, names):
  out = []
  for l in layers:
    v = l.node.inputs[l.act_operand]
    if len(graph.consumers.get(v, [])) != 1:
      continue
    u = _is_relu(graph, graph.producer.get(v))
    if u is None or len(graph.consumers.get(u, [])) != 1:
      continue
    prod = graph.producer.get(u)
    if prod is None or prod.name != "add":
      continue
    leaf = names.get(prod.module_path, {})
    channels = graph.avals[u].shape[-1]
    if {"scale", "bias"} <= set(leaf):           # a BatchNorm / affine
      first = [leaf["scale"], leaf["bias"]]
      kernel = None
    elif {"kernel", "bias"} <= set(leaf):         # a conv with a bias
      first = [leaf["bias"]]
      kernel = leaf["kernel"]
    else:
      continue
    if any(np.shape(leaves[i]) != (channels,) for i in first):
      continue
    if kernel is not None and np.shape(leaves[kernel])[-1] != channels:
      continue
    ax = _in_channel_axis(l, channels)
    if ax is None:
      continue
    out.append((v, prod.module_path, first, kernel, l, ax))
  return out


def equalize(graph, layers, leaves: list, params_tree, batches,
             report: list) -> list:
  """Returns new flat params with conv -> ReLU -> conv channel ranges
  equalized (``report`` gets one line per pair)."""
  cands = _candidates(graph, layers, leaves, _param_names(params_tree))
  if not cands:
    report.append("equalization: no conv / BatchNorm -> ReLU -> conv chain")
    return leaves
  fl_fn = _graph.float_capture(graph, [c[0] for c in cands])
  out_fn = _graph.float_capture(graph, list(graph.out_vars))
  rmax = [None] * len(cands)
  for batch in batches:
    for i, v in enumerate(fl_fn(leaves, _graph.flat_args(batch))):
      m = np.max(np.abs(np.asarray(v)).reshape(-1, v.shape[-1]), axis=0)
      rmax[i] = m if rmax[i] is None else np.maximum(rmax[i], m)
  check = _graph.flat_args(batches[0])
  before = [np.asarray(o) for o in out_fn(leaves, check)]
  leaves = list(leaves)
  for (v, path, first, kernel, l, (axis, depthwise)), r in zip(cands, rmax):
    live = r >= DEAD * r.max()       # a channel ReLU keeps at 0: left alone
    if not np.any(live):
      continue
    r = np.where(live, r, r.max())
    w = np.abs(np.asarray(leaves[l.param], np.float32))
    wr = np.max(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1), axis=1)
    if depthwise:
      s = r / r.max()
    else:
      s = np.sqrt(r / np.maximum(wr, 1e-12))
      s = s / s.max()
    s = np.clip(s, MIN_SCALE, 1.0).astype(np.float32)
    trial = list(leaves)
    for i in first:
      trial[i] = np.asarray(leaves[i], np.float32) / s
    if kernel is not None:
      trial[kernel] = np.asarray(leaves[kernel], np.float32) / s
    shape = [1] * w.ndim
    shape[axis] = -1
    trial[l.param] = np.asarray(leaves[l.param], np.float32) * s.reshape(shape)
    after = [np.asarray(o) for o in out_fn(trial, check)]
    if all(sqnr_db(b, c) >= 80.0 for b, c in zip(before, after)):
      leaves = trial
      r = r[live]
      s = s[live]
      spread = r.max() / r.min()
      report.append(f"equalization: {path} -> {l.name}"
                    f"{' (depthwise)' if depthwise else ''}: channel range "
                    f"spread {spread:.3g} -> "
                    f"{(r / s).max() / (r / s).min():.3g}")
    else:
      report.append(f"equalization: {path} -> {l.name}: not "
                    f"float-equivalent, undone")
  return leaves
