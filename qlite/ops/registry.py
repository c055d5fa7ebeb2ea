"""The registry of every op handler qlite knows (:data:`REGISTRY`).

Importing this module also registers the handlers' rewrites with
:mod:`qlite.trace.intercept`, so a traced model emits the composites they
own. A new op family: a module with a ``HANDLERS`` tuple, listed here.
"""

from __future__ import annotations

from qlite.ops import (activations, conv, elementwise, fully_connected, gelu,
                       masking, normalization, reductions, resize, segment,
                       shape, softmax)
from qlite.ops.base import Registry

FAMILIES = (conv, fully_connected, elementwise, activations, softmax, gelu,
            reductions, resize, shape, normalization, masking, segment)

REGISTRY = Registry()
for _module in FAMILIES:
  for _handler in _module.HANDLERS:
    REGISTRY.register(_handler)
del _module, _handler
