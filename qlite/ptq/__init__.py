"""PTQ algorithms that change the weights before the int8 export
(cross-layer equalization, SmoothQuant-style scale migration, AdaRound-style
rounding, bias correction): :func:`optimize`."""

from qlite.ptq.api import (ALGORITHMS, DEFAULT_ALGORITHMS, PtqResult,
                           optimize)

__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHMS", "PtqResult", "optimize"]
