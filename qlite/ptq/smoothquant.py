"""Activation -> weight scale migration (SmoothQuant-style) for a LayerNorm
whose output feeds only dense layers.

A LayerNorm output channel ``j`` with a large range widens the one int8
scale of the whole tensor. Dividing the LayerNorm's ``scale`` and ``bias``
by ``s_j`` and multiplying row ``j`` of every dense kernel that reads it by
``s_j`` leaves the float model unchanged and moves the range into the
weights, which are quantized per output channel:
``s_j = max|x_j| ** alpha / max|w_j| ** (1 - alpha)``. Each migration is
checked on a calibration batch: the float outputs must stay the same
(relative error <= 1e-4), or it is undone.
"""

from __future__ import annotations

import jax
import numpy as np

from qlite.metrics import sqnr_db
from qlite.ptq import _graph


def _param_names(params_tree) -> dict[str, dict[str, int]]:
  """module path -> {leaf name: flat index} (collection and NNX ``value``
  parts dropped)."""
  out: dict[str, dict[str, int]] = {}
  flat = jax.tree_util.tree_flatten_with_path(params_tree)[0]
  for i, (path, _) in enumerate(flat):
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
            for k in path]
    if keys and keys[-1] == "value":
      keys = keys[:-1]
    if keys and keys[0] in ("params", "batch_stats"):
      keys = keys[1:]
    if len(keys) >= 1:
      out.setdefault("/".join(keys[:-1]), {})[keys[-1]] = i
  return out


def _contracts_last(layer, ndim: int) -> int | None:
  """The kernel axis contracted with the activation's last axis, when the
  activation contracts on its last axis only (a dense layer)."""
  if layer.node.name != "dot_general":
    return None
  (lc, rc), _ = layer.node.params["dimension_numbers"]
  act_c, w_c = (lc, rc) if layer.act_operand == 0 else (rc, lc)
  if tuple(act_c) != (ndim - 1,) or len(w_c) != 1:
    return None
  return int(w_c[0])


def _candidates(graph, layers, names):
  """(scale index, bias index, [(layer, kernel row axis)]) per LayerNorm
  output read only by dense layers."""
  by_act: dict[int, list] = {}
  for l in layers:
    by_act.setdefault(l.node.inputs[l.act_operand], []).append(l)
  out = []
  for var, ls in by_act.items():
    if len(graph.consumers.get(var, [])) != len(ls):
      continue                      # also read by a residual add, etc.
    prod = graph.producer.get(var)
    if prod is None or prod.name != "add":
      continue
    leaf = names.get(prod.module_path, {})
    if "scale" not in leaf or "bias" not in leaf:
      continue
    ndim = len(graph.avals[var].shape)
    axes = [_contracts_last(l, ndim) for l in ls]
    if any(a is None for a in axes):
      continue
    out.append((var, leaf["scale"], leaf["bias"], list(zip(ls, axes))))
  return out


def migrate(graph, layers, leaves: list, params_tree, batches, report: list,
            *, alpha: float = 0.5) -> list:
  """Returns new flat params with LayerNorm -> dense scales migrated
  (``report`` gets one line per LayerNorm)."""
  cands = _candidates(graph, layers, _param_names(params_tree))
  if not cands:
    report.append("smoothquant: no LayerNorm whose output feeds only dense "
                  "layers")
    return leaves
  fl_fn = _graph.float_capture(graph, [c[0] for c in cands])
  out_fn = _graph.float_capture(graph, list(graph.out_vars))
  amax = [None] * len(cands)
  for batch in batches:
    vals = fl_fn(leaves, _graph.flat_args(batch))
    for i, v in enumerate(vals):
      m = np.max(np.abs(np.asarray(v)).reshape(-1, v.shape[-1]), axis=0)
      amax[i] = m if amax[i] is None else np.maximum(amax[i], m)
  check = _graph.flat_args(batches[0])
  leaves = list(leaves)
  for (var, si, bi, pairs), a in zip(cands, amax):
    wmax = None
    for l, axis in pairs:
      w = np.abs(np.asarray(leaves[l.param], np.float32))
      m = np.max(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1), axis=1)
      wmax = m if wmax is None else np.maximum(wmax, m)
    a = np.maximum(a, 1e-5)
    s = (a ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)).astype(np.float32)
    s = s / np.exp(np.mean(np.log(s)))        # geometric mean 1
    before = [np.asarray(o) for o in out_fn(leaves, check)]
    trial = list(leaves)
    trial[si] = (np.asarray(leaves[si], np.float32) / s)
    trial[bi] = (np.asarray(leaves[bi], np.float32) / s)
    for l, axis in pairs:
      shape = [1] * np.ndim(leaves[l.param])
      shape[axis] = -1
      trial[l.param] = np.asarray(leaves[l.param], np.float32) * s.reshape(
          shape)
    after = [np.asarray(o) for o in out_fn(trial, check)]
    same = all(sqnr_db(b, c) >= 80.0 for b, c in zip(before, after))
    name = graph.producer[var].module_path
    if same:
      leaves = trial
      report.append(f"smoothquant: {name} -> {len(pairs)} dense: channel "
                    f"range spread {a.max() / a.min():.3g} -> "
                    f"{(a / s).max() / (a / s).min():.3g}")
    else:
      report.append(f"smoothquant: {name}: not float-equivalent, undone")
  return leaves
