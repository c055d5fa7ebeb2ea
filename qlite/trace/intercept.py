"""One interceptor for library functions, whatever name user code calls them by.

A model reaches ``jax.nn.gelu`` as ``nn.gelu``, ``from jax.nn import gelu``,
``functools.partial(nn.gelu, approximate=False)`` stored in a dict at import
time, or a Linen dataclass field ``activation: Callable = jax.nn.gelu``.
Replacing module attributes misses every reference taken before tracing;
this module instead swaps the *code object* of the function itself, so every
alias of it dispatches through one place:

* :func:`register` ``(target, replacement)``: while interception is active in
  the calling thread, a call of ``target`` runs ``replacement(original,
  *args, **kwargs)``; ``original`` runs the untouched code.
* :func:`active` is a context manager that turns interception on for the
  calling thread only. Other threads calling ``target`` at the same time run
  the original code. The code objects are swapped under a lock while at
  least one thread is inside :func:`active`, and restored afterwards.

A jitted target (``jax.jit``-decorated, e.g. ``jax.nn.leaky_relu``) is
intercepted through the Python function it wraps; its trace cache is cleared
when interception starts and stops, so a trace made without interception is
not reused inside it (nor the other way round).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import types
import warnings
from typing import Any, Callable

_LOCK = threading.RLock()
_LOCAL = threading.local()
_MARK = "__qlite_intercept_dispatch__"


@dataclasses.dataclass
class _Entry:
  target: types.FunctionType      # the function object whose code is swapped
  jitted: Any                     # the jax.jit wrapper of target, or None
  code: types.CodeType            # target's own code
  original: types.FunctionType    # a copy of target running its own code
  trampoline: types.CodeType      # the code installed while active


_ENTRIES: dict[int, _Entry] = {}
_depth = 0                        # threads (and nestings) inside active()
_SUSPENDED: set[int] = set()      # targets that run their own code anyway


def _function_of(target) -> tuple[types.FunctionType, Any]:
  """The plain Python function behind ``target`` and its jit wrapper."""
  if isinstance(target, types.FunctionType):
    return target, None
  inner = getattr(target, "__wrapped__", None)
  if isinstance(inner, types.FunctionType) and hasattr(target, "clear_cache"):
    return inner, target
  raise TypeError(f"qlite.trace.intercept: cannot intercept {target!r}: not a "
                  f"Python function or a jax.jit of one")


def _trampoline(fn: types.FunctionType, dispatch: Callable) -> types.CodeType:
  """A code object with ``fn``'s name that calls ``dispatch`` (held as a
  constant of the code, so no global or closure of ``fn`` is touched)."""
  src = f"def {fn.__code__.co_name}(*args, **kwargs):\n" \
        f"  return {_MARK!r}(*args, **kwargs)\n"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", SyntaxWarning)   # 'str' is not callable
    namespace: dict = {}
    exec(compile(src, fn.__code__.co_filename, "exec"), namespace)  # noqa: S102
  code = namespace[fn.__code__.co_name].__code__
  consts = tuple(dispatch if c == _MARK else c for c in code.co_consts)
  names = {"co_consts": consts, "co_firstlineno": fn.__code__.co_firstlineno}
  if hasattr(code, "co_qualname"):          # Python >= 3.11
    names["co_qualname"] = fn.__code__.co_qualname
  return code.replace(**names)


def register(target, replacement: Callable) -> Callable:
  """Intercepts ``target`` (a Python function or a ``jax.jit`` of one).

  Args:
    target: the library function, e.g. ``jax.nn.gelu``.
    replacement: called as ``replacement(original, *args, **kwargs)`` instead
      of ``target`` while :func:`active`; ``original`` runs ``target``'s code.

  Returns:
    ``original``: a function running ``target``'s untouched code, at all times.

  Raises:
    TypeError: ``target`` cannot be intercepted (a closure, a builtin), or it
      is already registered.
  """
  fn, jitted = _function_of(target)
  if fn.__closure__:
    raise TypeError(f"qlite.trace.intercept: {fn.__qualname__} is a closure")
  with _LOCK:
    if id(fn) in _ENTRIES:
      raise TypeError(f"qlite.trace.intercept: {fn.__qualname__} is already "
                      f"intercepted")
    original = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__,
                                  fn.__defaults__, fn.__closure__)
    original.__kwdefaults__ = fn.__kwdefaults__
    original.__qualname__ = fn.__qualname__
    original.__doc__ = fn.__doc__

    def dispatch(*args, **kwargs):
      if getattr(_LOCAL, "active", 0) and id(fn) not in _SUSPENDED:
        return replacement(original, *args, **kwargs)
      return original(*args, **kwargs)

    entry = _Entry(fn, jitted, fn.__code__, original, _trampoline(fn, dispatch))
    _ENTRIES[id(fn)] = entry
    if _depth:
      _install(entry, True)
  return original


def _install(entry: _Entry, on: bool) -> None:
  entry.target.__code__ = entry.trampoline if on else entry.code
  if entry.jitted is not None:
    entry.jitted.clear_cache()


@contextlib.contextmanager
def active():
  """Turns interception on for the calling thread within the block."""
  global _depth
  with _LOCK:
    if _depth == 0:
      for entry in _ENTRIES.values():
        _install(entry, True)
    _depth += 1
  _LOCAL.active = getattr(_LOCAL, "active", 0) + 1
  try:
    yield
  finally:
    _LOCAL.active -= 1
    with _LOCK:
      _depth -= 1
      if _depth == 0:
        for entry in _ENTRIES.values():
          _install(entry, False)


@contextlib.contextmanager
def suspended(*targets):
  """Within the block, ``targets`` run their own code even while active (in
  every thread): for measuring what a rewrite changes."""
  ids = {id(_function_of(t)[0]) for t in targets}
  with _LOCK:
    new = ids - _SUSPENDED
    _SUSPENDED.update(new)
    for entry in _ENTRIES.values():
      if id(entry.target) in new and entry.jitted is not None:
        entry.jitted.clear_cache()
  try:
    yield
  finally:
    with _LOCK:
      _SUSPENDED.difference_update(new)


def is_active() -> bool:
  """True inside :func:`active` in the calling thread."""
  return bool(getattr(_LOCAL, "active", 0))
