"""Stats that fit the model: what calibration records about the model it ran
on, and the check that an export (or compare) uses stats from that model.

Calibration stores in ``QuantStats.meta``:

* ``params``: every parameter's path, shape and dtype (the model's
  structure: a layer resized under the same class name changes it);
* ``params_sha1``: a digest of the float parameter values (retrained or
  fine-tuned weights change it).

:func:`check_stats_fit` compares them with the model being exported and
raises :class:`~qlite.errors.CalibrationError` saying what differs.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlite.errors import CalibrationError


def _path(keys) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(
      k, "idx", k)))) for k in keys)


def params_layout(params: Any) -> dict[str, list]:
  """``{path: [shape, dtype]}`` of every parameter leaf."""
  out = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    out[_path(keys)] = [list(np.shape(leaf)), str(dtype)]
  return out


def params_digest(params: Any) -> str:
  """sha1 of the float parameter values (RNG keys and counters excluded:
  NNX models carry them and they change on every call)."""
  h = hashlib.sha1()
  for leaf in jax.tree_util.tree_leaves(params):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      continue
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def record(meta: dict, params: Any) -> None:
  """Stores the layout and digest of ``params`` in a stats' ``meta``."""
  meta["params"] = params_layout(params)
  meta["params_sha1"] = params_digest(params)


def check_stats_fit(meta: dict, params: Any, description: str, *,
                    allow_changed_weights: bool = False) -> None:
  """Raises when stats calibrated on one model are used with another.

  Args:
    meta: the stats' ``meta`` (stats without a record, e.g. from QAT or an
      older qlite, are not checked).
    params: the parameters of the model being exported.
    description: the model's name for messages.
    allow_changed_weights: accept the same structure with other weight
      values (e.g. fine-tuned weights whose activation ranges are known to
      be close).

  Raises:
    CalibrationError: a parameter was added, removed, or changed shape or
      dtype; or the weights changed and ``allow_changed_weights`` is False.
  """
  calibrated = meta.get("params")
  if calibrated is None:
    return
  now = params_layout(params)
  diffs = []
  for path in sorted(set(calibrated) | set(now)):
    a, b = calibrated.get(path), now.get(path)
    if a == b:
      continue
    if a is None:
      diffs.append(f"`{path}` is new ({tuple(b[0])}, {b[1]})")
    elif b is None:
      diffs.append(f"`{path}` is gone (was {tuple(a[0])}, {a[1]})")
    else:
      diffs.append(f"`{path}` is {tuple(b[0])} {b[1]}, calibrated with "
                   f"{tuple(a[0])} {a[1]}")
  if diffs:
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise CalibrationError(
        f"the stats were calibrated on a model with other parameters than "
        f"{description}: " + "; ".join(diffs[:3]) + more +
        ". Calibrate this model (qlite.calibrate) and export with those stats")
  if not allow_changed_weights and "params_sha1" in meta and \
      meta["params_sha1"] != params_digest(params):
    raise CalibrationError(
        f"the weights of {description} differ from those the stats were "
        f"calibrated with (same shapes, other values: retrained?); activation "
        f"ranges follow the weights, so calibrate again, or pass "
        f"allow_changed_weights=True to use these stats anyway")
