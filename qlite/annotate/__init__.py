"""``qlite.annotate``: the Qwix-style name of the LiteRT providers (an alias of
:mod:`qlite.litert`)."""

from qlite.litert import (CalibrationProvider, ConversionProvider, Plan,
                          Boundary, build_plan)

__all__ = ["CalibrationProvider", "ConversionProvider", "Plan", "Boundary",
           "build_plan"]
