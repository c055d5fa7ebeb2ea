"""Error metrics shared by demo, compare and tests."""

from __future__ import annotations

import numpy as np


def sqnr_db(reference, test) -> float:
  """Signal-to-quantization-noise ratio of ``test`` against ``reference``
  in dB (``inf`` when identical)."""
  ref = np.asarray(reference, np.float64)
  err = ref - np.asarray(test, np.float64)
  noise = float(np.sum(err * err))
  signal = float(np.sum(ref * ref))
  if noise == 0.0:
    return float("inf")
  if signal == 0.0:
    return float("-inf")
  return 10.0 * np.log10(signal / noise)


def cosine(a, b) -> float:
  """Cosine similarity of two flattened arrays."""
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  if na == 0 or nb == 0:
    return float(na == nb)
  return float(a @ b / (na * nb))
