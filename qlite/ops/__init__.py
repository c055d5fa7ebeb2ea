"""LiteRT op handlers: what each op family means for a full-integer LiteRT
model (one module per family), and the rewrites that trace library functions
as the composites the converter lowers to native int8 kernels.

:data:`REGISTRY` maps a primitive or composite name to its
:class:`~qlite.ops.base.OpHandler`; the planner asks it and never names an op.
"""

from qlite.ops.base import (COMPUTE, PASS_THROUGH, WEIGHTED, OpHandler,
                            PlanContext, Registry)
from qlite.ops.registry import FAMILIES, REGISTRY

__all__ = ["COMPUTE", "PASS_THROUGH", "WEIGHTED", "OpHandler", "PlanContext",
           "Registry", "FAMILIES", "REGISTRY"]
