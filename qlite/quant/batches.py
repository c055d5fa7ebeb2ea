"""What a batch of model inputs may be, and a message for one that is not.

qlite calls the model with each batch as positional arguments: a batch is
one array, or a tuple / list of arrays (``model(*batch)``). A dict batch, or
a Python bool (``(x, True)`` for a ``train`` flag) inside one, is not data:
traced, the bool becomes an array and ``if train:`` fails deep inside jax
(``TracerBoolConversionError``), and a dict has no positions.
:func:`describe_bad_batch` names the problem and the fix; the calibration,
export and compare entry points raise it as a :class:`~qlite.QliteError`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = ["describe_bad_batch"]

_FLAG_FIX = (
    "batches hold positional arrays only; give flags to the model instead: "
    "for a Linen model pass `functools.partial(model.apply, train=False)` "
    "(any keyword of its __call__) as the model, with variables=...; for an "
    "NNX model set them on the module (model.eval(), or an attribute its "
    "__call__ reads); or make them static config (a module attribute such "
    "as `deterministic=True`)")


def _what(x: Any) -> str | None:
  """Why ``x`` cannot be one positional array argument (None: it can)."""
  if isinstance(x, (bool, np.bool_)):
    return f"the Python bool {bool(x)!r} (a flag?)"
  if isinstance(x, Mapping):
    keys = ", ".join(repr(k) for k in list(x)[:6])
    return f"a {type(x).__name__} (keys {keys})"
  if x is None:
    return "None"
  if isinstance(x, (str, bytes)):
    return f"a {type(x).__name__} {x!r:.40}"
  dtype = getattr(x, "dtype", None)
  if dtype is not None and getattr(x, "ndim", None) == 0 and \
      np.dtype(dtype) == np.bool_:
    return f"a 0-d bool array ({bool(np.asarray(x))!r}; a flag?)"
  if isinstance(x, (tuple, list)):
    for y in x:
      inner = _what(y)
      if inner is not None:
        return f"a {type(x).__name__} holding {inner}"
  return None


def describe_bad_batch(batch: Any, *, what: str = "the batch") -> str | None:
  """Returns why ``batch`` cannot be a batch of positional model inputs,
  with the fix, or None when it can.

  Not allowed: a dict (or any Mapping) batch; a batch, or an argument of a
  tuple / list batch, that is a Python bool or 0-d bool array (a flag), a
  dict, None or a string. Bool arrays with dimensions (masks) are data and
  allowed.

  ``what`` names the batch in the message (e.g. ``"calibration batch 3"``).
  """
  if isinstance(batch, Mapping):
    keys = ", ".join(repr(k) for k in list(batch)[:6])
    more = ", ..." if len(batch) > 6 else ""
    return (f"{what} is a {type(batch).__name__} (keys {keys}{more}); qlite "
            f"calls the model with each batch as positional arguments: give "
            f"an array or a tuple of arrays in the order of the model's "
            f"__call__ (e.g. `(b['x'], b['mask'])` for each dict b); "
            f"keyword-only inputs need a wrapper that takes them "
            f"positionally, and flags: {_FLAG_FIX}")
  if isinstance(batch, (tuple, list)):
    for i, x in enumerate(batch):
      problem = _what(x)
      if problem is not None:
        fix = _FLAG_FIX if "bool" in problem else (
            "batches hold positional arrays only: give every model input "
            "as an array (a dict input: its arrays, in __call__'s order)")
        return f"{what}: argument {i} is {problem}; {fix}"
    return None
  problem = _what(batch)
  if problem is None:
    return None
  fix = _FLAG_FIX if "bool" in problem else (
      "batches hold positional arrays only (an array or a tuple of arrays)")
  return f"{what} is {problem}; {fix}"
