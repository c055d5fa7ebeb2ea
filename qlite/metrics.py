"""Error metrics shared by demo, compare and tests.

:func:`sqnr_db` and :func:`cosine` take two arrays; :func:`sqnr_db_from_power`
and :func:`cosine_from_sums` take the sums they are made of, for callers that
accumulate those sums over chunks of data (``qlite.compare``). Both forms give
the same numbers for the same sums.
"""

from __future__ import annotations

import math

import numpy as np


def sqnr_db_from_power(signal: float, noise: float) -> float:
  """Signal-to-quantization-noise ratio in dB from summed powers.

  Args:
    signal: ``sum(reference ** 2)``.
    noise: ``sum((reference - test) ** 2)``.

  Returns:
    ``10 log10(signal / noise)``; ``inf`` when ``noise`` is 0, ``-inf`` when
    only ``signal`` is 0.
  """
  if noise == 0.0:
    return math.inf
  if signal == 0.0:
    return -math.inf
  return float(10.0 * np.log10(signal / noise))


def sqnr_db(reference, test) -> float:
  """Signal-to-quantization-noise ratio of ``test`` against ``reference``
  in dB (``inf`` when identical)."""
  ref = np.asarray(reference, np.float64)
  err = ref - np.asarray(test, np.float64)
  return sqnr_db_from_power(float(np.sum(ref * ref)), float(np.sum(err * err)))


def cosine_from_sums(dot: float, a_sq: float, b_sq: float) -> float:
  """Cosine similarity from ``sum(a * b)``, ``sum(a ** 2)``, ``sum(b ** 2)``.

  Returns 1.0 when both norms are 0 and 0.0 when only one is.
  """
  na, nb = math.sqrt(a_sq), math.sqrt(b_sq)
  if na == 0 or nb == 0:
    return float(na == nb)
  return float(dot / (na * nb))


def cosine(a, b) -> float:
  """Cosine similarity of two flattened arrays."""
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  return cosine_from_sums(float(a @ b), float(a.dot(a)), float(b.dot(b)))
