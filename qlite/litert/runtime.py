"""Run a ``.tflite`` model with the LiteRT interpreter."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qlite.errors import QliteError


class TFLiteRunner:
  """Runs a ``.tflite`` model on flat numpy inputs (in signature order).

  int8 model inputs / outputs are quantized / dequantized with the tensor's
  own scale, so callers always pass and get float arrays. ``xnnpack=False``
  runs LiteRT's builtin kernels only (the XNNPACK delegate is otherwise
  tried first).
  """

  def __init__(self, model: bytes, *, num_threads: int | None = None,
               preserve_all_tensors: bool = False, xnnpack: bool = True):
    import warnings
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    self.delegate_error: str | None = None
    self._fixed: list[np.ndarray] = []

    def load(resolver=None):
      kw = {} if resolver is None else dict(
          experimental_op_resolver_type=resolver)
      interpreter = Interpreter(
          model_content=bytes(model), num_threads=num_threads,
          experimental_preserve_all_tensors=preserve_all_tensors, **kw)
      interpreter.allocate_tensors()
      return interpreter

    builtin = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      try:
        self.interpreter = load(None if xnnpack else builtin)
      except (RuntimeError, ValueError) as e:
        if not xnnpack:
          raise QliteError(f"LiteRT cannot load the model: {e}") from None
        # XNNPACK refuses some degenerate shapes; LiteRT's builtin kernels
        # still run the model (as a phone without the delegate would).
        self.delegate_error = str(e)
        try:
          self.interpreter = load(builtin)
        except (RuntimeError, ValueError) as e2:
          raise QliteError(f"LiteRT cannot load the model: {e2}") from None
    self.runner = self.interpreter.get_signature_runner()
    details = self.runner.get_input_details()
    self.input_names = sorted(details, key=_index_of_name)
    self.input_details = [details[n] for n in self.input_names]
    out = self.runner.get_output_details()
    self.output_names = sorted(out, key=_index_of_name)
    self.output_details = [out[n] for n in self.output_names]

  def set_fixed_inputs(self, values: Sequence[np.ndarray]) -> None:
    """Fixes the model's last ``len(values)`` inputs (e.g. weights fed as
    inputs); :meth:`run` then takes only the others. Converted once; each
    run copies them into the input tensors (no new allocation)."""
    first = len(self.input_details) - len(values)
    if first < 0:
      raise QliteError(f"the .tflite model takes {len(self.input_details)} "
                       f"inputs, got {len(values)} fixed ones")
    self._fixed = self._checked(self.input_names[first:],
                                self.input_details[first:], values)

  def _checked(self, names, details, values) -> list[np.ndarray]:
    out = []
    for name, d, x in zip(names, details, values):
      x = np.asarray(x)
      want = tuple(int(n) for n in d["shape"])
      if tuple(x.shape) != want:
        raise QliteError(f".tflite input {name!r} has shape {want}, got an "
                         f"array of shape {tuple(x.shape)} (a .tflite from "
                         f"another model, or another batch size?)")
      out.append(_to_model_dtype(x, d))
    return out

  def run(self, *flat_inputs: np.ndarray) -> list[np.ndarray]:
    """Returns the float outputs for ``flat_inputs`` (all inputs but the
    ones set by :meth:`set_fixed_inputs`).

    Raises:
      QliteError: wrong number of inputs or a shape the model does not take.
    """
    n = len(self.input_details) - len(self._fixed)
    if len(flat_inputs) != n:
      raise QliteError(f"the .tflite model takes {n} inputs, got "
                       f"{len(flat_inputs)}")
    feed = self._checked(self.input_names[:n], self.input_details[:n],
                         flat_inputs) + self._fixed
    outs = self.runner(**dict(zip(self.input_names, feed)))
    return [_from_model_dtype(outs[n], d)
            for n, d in zip(self.output_names, self.output_details)]

  def tensor(self, index: int) -> np.ndarray:
    """Returns intermediate tensor ``index`` (needs preserve_all_tensors)."""
    return self.interpreter.get_tensor(index)


def _index_of_name(name: str):
  tail = name.rsplit("_", 1)[-1]
  return (int(tail) if tail.isdigit() else 1 << 30, name)


def _to_model_dtype(x, d):
  dtype = np.dtype(d["dtype"])
  if np.issubdtype(dtype, np.integer) and np.issubdtype(x.dtype, np.floating):
    scale, zp = d["quantization"]
    if scale:
      info = np.iinfo(dtype)
      return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(dtype)
  return x.astype(dtype, copy=False)


def _from_model_dtype(y, d):
  dtype = np.dtype(d["dtype"])
  if np.issubdtype(dtype, np.integer):
    scale, zp = d["quantization"]
    if scale:
      return (y.astype(np.float32) - zp) * np.float32(scale)
  return np.asarray(y)
