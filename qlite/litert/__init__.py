"""The LiteRT backend: calibration / conversion providers, the fake-quant
composite, the converter hand-off, inspect, runtime and the export pipeline."""

from qlite.litert.providers import CalibrationProvider, ConversionProvider
from qlite.quant.plan import Plan, Boundary, build_plan

__all__ = ["CalibrationProvider", "ConversionProvider", "Plan", "Boundary",
           "build_plan"]
