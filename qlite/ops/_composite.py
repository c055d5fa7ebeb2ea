"""Composites with a vmap rule, built from public jax APIs.

:func:`rank_polymorphic` wraps ``jax.lax.composite(fn, name)`` in
``jax.custom_batching.custom_vmap`` so that, under ``vmap`` (``nn.vmap``,
``jax.vmap``), the batched call emits the same composite again on the
batched operand (moved to axis 0) instead of failing: the composite ops
qlite emits act on trailing axes only.
"""

from __future__ import annotations

from typing import Callable

import jax


def rank_polymorphic(name: str, fn: Callable, batched: Callable | None = None,
                     **attributes) -> Callable:
  """Returns ``f(x)`` = the composite ``name`` of ``fn`` applied to ``x``
  with ``attributes``, batchable with ``vmap``.

  Args:
    name: the composite's name (what the converter pattern-matches).
    fn: its decomposition, ``fn(x, **attributes)``.
    batched: ``batched(x)`` for a batched ``x`` (batch axis 0); default: the
      composite itself on the batched array (ops over trailing axes).
    **attributes: the composite's attributes.
  """
  def call(x):
    return jax.lax.composite(fn, name=name)(x, **attributes)

  @jax.custom_batching.custom_vmap
  def f(x):
    return call(x)

  @f.def_vmap
  def rule(axis_size, in_batched, x):
    del axis_size
    if not in_batched[0]:
      return f(x), False
    return (batched or f)(x), True

  return f
