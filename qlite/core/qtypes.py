"""Quantization types: the value range and storage dtype of each ``qtype``.

A :class:`QType` is a small immutable description of a quantized number
format. Look one up by name with :func:`get_qtype`. ``QType`` objects are
hashable, so they can be static (aux) data of a JAX pytree.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import ml_dtypes
import numpy as np

from qlite.errors import QTypeError

__all__ = ["QType", "get_qtype", "qtype_names", "NF4_LEVELS"]

INT = "int"
FLOAT = "float"
NF4 = "nf4"


def _normal_float4_levels(offset: float = 0.9677083) -> np.ndarray:
  """Returns the 16 NormalFloat4 levels (QLoRA, Dettmers et al. 2023).

  Levels are quantiles of N(0, 1): 8 positive levels from probabilities
  evenly spaced in ``[0.5, offset]``, 7 negative ones from ``[0.5, offset]``
  with 8 points, and an exact zero; normalized so the extremes are -1 and 1.
  """
  normal = statistics.NormalDist()
  positive = [normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  negative = [-normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  levels = np.sort(np.array(positive + [0.0] + negative, dtype=np.float64))
  levels /= np.abs(levels).max()
  return levels.astype(np.float32)


NF4_LEVELS: np.ndarray = _normal_float4_levels()
"""The 16 NormalFloat4 levels in [-1, 1] (read-only float32 array): an
``nf4`` value is a uint8 index into it, times the scale."""
NF4_LEVELS.setflags(write=False)


@dataclasses.dataclass(frozen=True)
class QType:
  """A quantized number format.

  Attributes:
    name: canonical name, e.g. ``"int8"``, ``"fp8_e4m3"``, ``"nf4"``.
    kind: ``"int"``, ``"float"`` or ``"nf4"``.
    bits: number of bits of one value (``int3`` -> 3, even if stored in int8).
    signed: whether negative values are representable.
    storage_dtype: numpy / ml_dtypes dtype holding the quantized values.
      Narrow ints other than int4 (int2, int3, int5..int7) are emulated in
      int8; nf4 stores uint8 codes (indices into :data:`NF4_LEVELS`).
  """

  name: str
  kind: str
  bits: int
  signed: bool
  storage_dtype: Any

  @property
  def is_int(self) -> bool:
    """Returns True for integer qtypes (int2..int16, uint8)."""
    return self.kind == INT

  @property
  def qmin(self) -> float:
    """Returns the smallest representable value.

    int: the integer minimum (int8 -> -128, uint8 -> 0); float: -max_finite;
    nf4: -1.0 (normalized level).
    """
    if self.kind == INT:
      return -(1 << (self.bits - 1)) if self.signed else 0
    if self.kind == FLOAT:
      return -float(ml_dtypes.finfo(self.storage_dtype).max)
    return -1.0

  @property
  def qmax(self) -> float:
    """Returns the largest representable value (int8 -> 127, e4m3 -> 448.0, nf4 -> 1.0)."""
    if self.kind == INT:
      return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1
    if self.kind == FLOAT:
      return float(ml_dtypes.finfo(self.storage_dtype).max)
    return 1.0

  def narrow_qmin(self, narrow_range: bool) -> float:
    """Returns the smallest value used when ``narrow_range`` is requested.

    For integer qtypes a narrow range drops the lowest code so the range is
    symmetric (int8: -127..127; uint8: 1..255). Non-integer qtypes are
    already symmetric: ``qmin`` is returned unchanged.
    """
    if narrow_range and self.kind == INT:
      return self.qmin + 1
    return self.qmin

  @property
  def storage_itemsize_bits(self) -> int:
    """Returns the number of bits one stored value occupies (int4: 4; int3: 8)."""
    if np.dtype(self.storage_dtype) == np.dtype(ml_dtypes.int4):
      return 4
    return np.dtype(self.storage_dtype).itemsize * 8

  def __repr__(self) -> str:
    return f"QType({self.name!r})"


def _int_qtype(bits: int) -> QType:
  if bits == 4:
    storage = np.dtype(ml_dtypes.int4)
  elif bits <= 8:
    storage = np.dtype(np.int8)
  else:
    storage = np.dtype(np.int16)
  return QType(f"int{bits}", INT, bits, True, storage)


_QTYPES: dict[str, QType] = {}
for _bits in (2, 3, 4, 5, 6, 7, 8, 16):
  _QTYPES[f"int{_bits}"] = _int_qtype(_bits)
_QTYPES["uint8"] = QType("uint8", INT, 8, False, np.dtype(np.uint8))
_QTYPES["fp8_e4m3"] = QType(
    "fp8_e4m3", FLOAT, 8, True, np.dtype(ml_dtypes.float8_e4m3fn))
_QTYPES["fp8_e5m2"] = QType(
    "fp8_e5m2", FLOAT, 8, True, np.dtype(ml_dtypes.float8_e5m2))
_QTYPES["nf4"] = QType("nf4", NF4, 4, True, np.dtype(np.uint8))

_ALIASES = {
    "float8_e4m3fn": "fp8_e4m3",
    "e4m3": "fp8_e4m3",
    "float8_e5m2": "fp8_e5m2",
    "e5m2": "fp8_e5m2",
}


def qtype_names() -> tuple[str, ...]:
  """Returns the accepted qtype names: canonical names, then aliases."""
  return tuple(_QTYPES) + tuple(_ALIASES)


def get_qtype(q: str | QType) -> QType:
  """Returns the :class:`QType` named ``q`` (or ``q`` itself if already a QType).

  Names are case-insensitive. Raises:
    QTypeError: ``q`` is an unknown name (the message lists the valid names),
      or is neither a string nor a QType.
  """
  if isinstance(q, QType):
    return q
  if not isinstance(q, str):
    raise QTypeError(
        f"qtype must be a name (str) or a qlite QType, got {type(q).__name__} "
        f"{q!r}. Valid names: {', '.join(qtype_names())}.")
  key = q.strip().lower()
  key = _ALIASES.get(key, key)
  if key not in _QTYPES:
    raise QTypeError(
        f"Unknown qtype {q!r}. Valid names: {', '.join(qtype_names())}.")
  return _QTYPES[key]
