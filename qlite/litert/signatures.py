"""Multi-signature ``.tflite`` export: several jax functions (e.g. an LM's
``prefill`` and ``decode``) in one flatbuffer, as named signatures that share
one copy of the weights.

Each function is exported to StableHLO on its own (its large constants
hoisted to arguments and bound back as constants inside the converter, as
:func:`qlite.litert.convert.convert_function` does), renamed to its
signature name by the converter's ``set_signature``, and the modules are
merged (``converter_api_ext.merge_modules``) into one converted model. The
flatbuffer writer stores identical constant buffers once: weights closed
over by several signatures are written once (measured: two signatures over
one 256 KiB weight give a 258 KiB file).

Weight formats other than float are applied to the converted float model
(:mod:`qlite.litert.weight_formats`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from qlite.errors import ConversionError, QliteError
from qlite.litert import convert as convert_lib


def _avals(args, name: str) -> list:
  out = []
  for i, a in enumerate(args):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
      a = np.asarray(a)
    if a.dtype == object:
      raise QliteError(f"signature {name!r}: example arg {i} is not an "
                       f"array ({type(a).__name__}); pass numpy arrays or "
                       f"numpy scalars (e.g. np.int32(0))")
    out.append(jax.ShapeDtypeStruct(tuple(np.shape(a)), np.dtype(a.dtype)))
  return out


def signature_function(model, fn, variables=None) -> Callable:
  """Returns a function of the signature's flat args.

  ``fn``: a callable ``f(*args)`` (used as is when ``model`` is None), or
  the name of a method of ``model`` (a Linen module with ``variables``:
  ``model.apply(variables, *args, method=fn)``; an NNX module:
  ``getattr(model, fn)(*args)``). Outputs are flattened (a tuple or any
  pytree of arrays).

  Raises:
    QliteError: ``fn`` is neither, or ``model`` is not a Flax module.
  """
  from flax import linen as nn
  from flax import nnx
  if model is None:
    if not callable(fn):
      raise QliteError(f"a signature without a model needs a callable, got "
                       f"{type(fn).__name__}")
    body = fn
  elif isinstance(model, nn.Module):
    if variables is None:
      raise QliteError(f"{type(model).__name__} is a Flax Linen module: "
                       f"pass its variables (variables=...)")
    if isinstance(fn, str) and not hasattr(model, fn):
      raise QliteError(f"{type(model).__name__} has no method {fn!r}")
    body = lambda *a: model.apply(variables, *a, method=fn)
  elif isinstance(model, nnx.Module):
    if variables is not None:
      raise QliteError(f"{type(model).__name__} is an NNX module: pass "
                       f"variables=None")
    if isinstance(fn, str):
      if not callable(getattr(model, fn, None)):
        raise QliteError(f"{type(model).__name__} has no method {fn!r}")
      graphdef, state = nnx.split(model)

      def body(*a, _state=state):
        return getattr(nnx.merge(graphdef, _state), fn)(*a)
    else:
      body = fn
  else:
    raise QliteError(f"signatures need a flax.linen.Module (with "
                     f"variables), an nnx.Module, or model=None with "
                     f"callables; got {type(model).__name__}")

  def flat(*args):
    return jax.tree.leaves(body(*args))
  flat.__name__ = fn if isinstance(fn, str) else getattr(fn, "__name__", "fn")
  return flat


def export_signatures(signatures: Mapping[str, Sequence[Any]], *,
                      model=None, variables=None,
                      names: Mapping[str, tuple] | None = None,
                      weights: str = "float", path=None) -> bytes:
  """Exports one ``.tflite`` holding one named signature per entry of
  ``signatures``; returns its bytes.

  Args:
    signatures: ``{name: (fn, example_args)}`` or ``{name: (fn,
      example_args, input_names, output_names)}``; ``fn`` a callable of the
      args or the name of a method of ``model``; ``example_args`` a tuple of
      arrays (numpy scalars for scalar inputs) fixing shapes and dtypes.
    model: a Flax Linen (with ``variables``) or NNX module whose methods
      ``fn`` names; None when every ``fn`` is a callable.
    variables: the Linen variables; None for NNX.
    names: ``{name: (input_names, output_names)}`` for the signatures'
      tensors (default ``input_<i>`` / ``output_<i>``).
    weights: a weight format of :data:`qlite.litert.weight_formats.FORMATS`
      (``"float"``, ``"int8"``, ``"int8_dynamic"``, ``"int4"``,
      ``"int4_dynamic"``, ``"int4_block32"`` ...), applied to the converted
      float model.
    path: if given, the file is also written there, atomically.

  Returns:
    The ``.tflite`` bytes; ``inspect_tflite(blob).signatures`` lists the
    signatures, ``TFLiteRunner(blob, signature=name)`` runs one.

  Raises:
    QliteError: an empty mapping, a bad entry, wrong name counts, an
      unknown weight format.
    ConversionError: jax.export or the converter failed.
  """
  from qlite.litert import weight_formats
  weight_formats.check_format(weights)
  if not signatures:
    raise QliteError("signatures is empty: pass {name: (fn, example_args)}")
  specs = []
  for name, entry in signatures.items():
    if not isinstance(name, str) or not name.isidentifier():
      raise QliteError(f"signature name {name!r} must be an identifier "
                       f"(e.g. 'prefill')")
    if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 4):
      raise QliteError(f"signature {name!r}: expected (fn, example_args) or "
                       f"(fn, example_args, input_names, output_names), got "
                       f"{type(entry).__name__}")
    fn, args = entry[:2]
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    avals = _avals(args, name)
    label = fn if isinstance(fn, str) else getattr(fn, "__name__", "fn")
    fn = signature_function(model, fn, variables)
    try:
      n_out = len(jax.eval_shape(fn, *avals))
    except QliteError:
      raise
    except Exception as e:
      raise QliteError(
          f"signature {name!r}: {label}(*example_args) failed on the "
          f"example args' shapes {[tuple(a.shape) for a in avals]}: "
          f"{type(e).__name__}: {e}") from e
    ins, outs = entry[2:] if len(entry) == 4 else \
        (names or {}).get(name, (None, None))
    ins = list(ins or [f"input_{i}" for i in range(len(avals))])
    outs = list(outs or [f"output_{i}" for i in range(n_out)])
    if len(ins) != len(avals) or len(outs) != n_out:
      raise QliteError(f"signature {name!r}: {len(ins)} input names for "
                       f"{len(avals)} inputs, {len(outs)} output names for "
                       f"{n_out} outputs")
    fn2, w = convert_lib._hoist_weights(fn, avals)
    w_avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in w]
    specs.append((name, convert_lib.stablehlo_bytecode(fn2, avals + w_avals),
                  w, ins, outs))
    del fn, fn2
  convert_lib.release_heap()
  with convert_lib.sigint_deferred():
    blob = _convert(specs)
  del specs
  convert_lib.release_heap()
  blob = weight_formats.apply(blob, weights)
  if path is not None:
    convert_lib.write_atomic(path, blob)
  return blob


def _convert(specs) -> bytes:
  from litert_converter import _stablehlo
  from litert_converter import converter_api_ext as capi
  from litert_converter.mlir import ir, passmanager
  ctx = ir.Context()
  capi.prepare_mlir_context(ctx)
  try:
    with ctx:
      modules = []
      while specs:
        name, data, w, ins, outs = specs.pop(0)
        module = _stablehlo.deserialize_portable_artifact(ctx, data)
        del data
        if len(w):
          convert_lib._bind_weights(module, w)
        del w
        capi.set_signature(module.operation, name, ins, outs)
        modules.append(module)
      merged = modules[0] if len(modules) == 1 else \
          capi.merge_modules(modules)
      del modules
      cfg = capi.ConvertToTFLConfig()
      cfg.qdq_conversion_mode = "NONE"
      capi.run_convert_to_tfl_passes(merged, passmanager.PassManager(), cfg)
      return bytes(capi.export_flatbuffer_to_bytes(merged.operation))
  except Exception as e:
    raise ConversionError(f"litert-converter failed on the signatures: "
                          f"{type(e).__name__}: {e}") from e
