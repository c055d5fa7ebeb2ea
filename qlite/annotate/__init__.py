"""ODML (LiteRT) provider: calibration pass, conversion pass, LiteRT op table."""

from qlite.annotate.providers import CalibrationProvider, ConversionProvider
from qlite.plan import Plan, Boundary, build_plan

__all__ = ["CalibrationProvider", "ConversionProvider", "Plan", "Boundary",
           "build_plan"]
