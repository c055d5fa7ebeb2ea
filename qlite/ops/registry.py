"""The registry of every op handler qlite knows (:data:`REGISTRY`).

Importing this module also registers the handlers' rewrites with
:mod:`qlite.trace.intercept`, so a traced model emits the composites they
own. A new op family: a module with a ``HANDLERS`` tuple, listed here.
"""

from __future__ import annotations

from qlite.ops import (activations, conv, elementwise, fully_connected, gelu,
                       int_lookup, masking, normalization, reductions, resize,
                       segment, shape, softmax)
from qlite.ops.base import Registry

FAMILIES = (conv, fully_connected, elementwise, activations, softmax, gelu,
            reductions, resize, shape, normalization, masking, segment,
            int_lookup)
"""The op-handler modules, one per op family; each has a ``HANDLERS``
tuple (the coverage table, ``python -m qlite.ops.coverage``, lists them)."""

REGISTRY = Registry()
"""The :class:`~qlite.ops.base.Registry` of every handler of
:data:`FAMILIES`: maps a jax primitive or composite name to its handler."""
for _module in FAMILIES:
  for _handler in _module.HANDLERS:
    REGISTRY.register(_handler)
del _module, _handler
