"""Run a ``.tflite`` model with the LiteRT interpreter."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qlite.errors import QliteError


class TFLiteRunner:
  """Runs a ``.tflite`` model with the LiteRT interpreter on numpy arrays.

  Inputs and outputs are flat, in signature order. int8 model inputs /
  outputs are quantized / dequantized with the tensor's own scale, so
  callers always pass and get float arrays. The XNNPACK delegate is tried
  first; when it refuses the model, LiteRT's builtin kernels run it (as on
  a phone without the delegate) and :attr:`delegate_error` says why.

  Args:
    model: the ``.tflite`` bytes (for a file: ``open(path, "rb").read()``).
    num_threads: interpreter threads (None: LiteRT's default).
    preserve_all_tensors: keep every intermediate tensor readable with
      :meth:`tensor` after :meth:`run` (more memory).
    xnnpack: False runs LiteRT's builtin kernels only.
    signature: the signature to run, by name (e.g. ``"decode"`` of a
      multi-signature LM, :func:`qlite.litert.signatures.export_signatures`);
      None for a model with one signature. Its inputs / outputs are then in
      the order the signature was exported with.

  Attributes:
    input_names: the signature's input names, in order.
    output_names: the signature's output names, in order.
    delegate_error: why XNNPACK refused the model, or None.
    interpreter: the ``ai_edge_litert`` ``Interpreter``.

  Raises:
    QliteError: LiteRT cannot load the model (not a ``.tflite``, or an op it
      cannot prepare); no signature ``signature``, or None for a model with
      several.

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> rules = [qlite.QuantizationRule()]
    >>> stats = qlite.calibrate(model, rules, [x, -x], variables=variables,
    ...                         progress=False)
    >>> blob = qlite.export_tflite(model, rules, stats, x, variables=variables)
    >>> runner = qlite.TFLiteRunner(blob)
    >>> (y,) = runner.run(x)
    >>> y.shape, y.dtype
    ((1, 4), dtype('float32'))
  """

  def __init__(self, model: bytes, *, num_threads: int | None = None,
               preserve_all_tensors: bool = False, xnnpack: bool = True,
               signature: str | None = None):
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
    sigs = self.interpreter.get_signature_list()
    if signature is None and len(sigs) > 1:
      raise QliteError(f"the .tflite model has {len(sigs)} signatures "
                       f"({', '.join(sigs)}): pass signature=<name>")
    if signature is not None and signature not in sigs:
      raise QliteError(f"the .tflite model has no signature {signature!r}; "
                       f"it has: {', '.join(sigs) or 'none'}")
    self.signature = signature
    self.runner = self.interpreter.get_signature_runner(signature)
    # Named signatures keep their subgraph's input / output order; the
    # default one its input_<i> / output_<i> numbering.
    details = self.runner.get_input_details()
    out = self.runner.get_output_details()
    if signature is None:
      in_key = out_key = _index_of_name
    else:
      ins, outs = _subgraph_io(model if isinstance(model, bytes) else
                               bytes(model), int(getattr(
          self.runner, "_subgraph_index", 0)))
      in_key = lambda n: ins.get(int(details[n]["index"]), 1 << 30)
      out_key = lambda n: outs.get(int(out[n]["index"]), 1 << 30)
    self.input_names = sorted(details, key=in_key)
    self.input_details = [details[n] for n in self.input_names]
    self.output_names = sorted(out, key=out_key)
    self.output_details = [out[n] for n in self.output_names]

  def set_fixed_inputs(self, values: Sequence[np.ndarray]) -> None:
    """Fixes the model's last inputs to ``values`` (e.g. weights fed as inputs).

    :meth:`run` then takes only the other inputs. The values are converted
    to the inputs' dtypes once; each run copies them into the input tensors
    (no new allocation).

    Args:
      values: arrays for the last ``len(values)`` model inputs, in signature
        order (an empty sequence un-fixes them).

    Returns:
      None.

    Raises:
      QliteError: more values than model inputs, or a value of a shape its
        input does not take.

    Example:
      >>> class MatMul(nn.Module):        # a model f(x, w)
      ...   def __call__(self, x, w):
      ...     return x @ w
      >>> w = np.ones((8, 4), np.float32)
      >>> blob = qlite.export_float_tflite(MatMul(), (x, w), variables={})
      >>> runner = qlite.TFLiteRunner(blob)
      >>> runner.set_fixed_inputs([w])
      >>> runner.run(x)[0]
      array([[8., 8., 8., 8.]], dtype=float32)
    """
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
    """Runs the model and returns its outputs as float arrays.

    Args:
      *flat_inputs: one array per model input, in signature order, without
        the inputs fixed by :meth:`set_fixed_inputs`. A float array for an
        int8 input is quantized with the input's scale and zero point;
        other arrays are cast to the input's dtype.

    Returns:
      The list of outputs, in signature order; int8 outputs dequantized to
      float32.

    Raises:
      QliteError: a wrong number of inputs, or an array of a shape the model
        does not take (e.g. another batch size).

    Example:
      >>> outputs = runner.run(x)   # runner, x: the class example's
      >>> [y.shape for y in outputs]
      [(1, 4)]
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
    """Returns the value of tensor ``index`` after the last :meth:`run`.

    Intermediate tensors keep their values only when the runner was made
    with ``preserve_all_tensors=True`` (otherwise LiteRT reuses their
    memory).

    Args:
      index: a tensor index (``TensorInfo.index``, from
        :func:`qlite.inspect_tflite`).

    Returns:
      A copy of the tensor's value in its model dtype (int8 tensors are not
      dequantized).

    Raises:
      ValueError: ``index`` is not a tensor of the model (raised by LiteRT).

    Example:
      >>> runner = qlite.TFLiteRunner(blob, preserve_all_tensors=True)
      >>> _ = runner.run(x)           # blob, x: the class example's
      >>> q = qlite.inspect_tflite(blob).tensors[1]   # QUANTIZE's output
      >>> runner.tensor(q.index).dtype
      dtype('int8')
    """
    return self.interpreter.get_tensor(index)


def _subgraph_io(model: bytes, subgraph: int) -> tuple[dict, dict]:
  """``({tensor index: position}, ...)`` of a subgraph's inputs and outputs
  (lazy flatbuffer reads: no buffer is copied)."""
  from ai_edge_litert import schema_py_generated as schema
  sg = schema.Model.GetRootAs(model, 0).Subgraphs(subgraph)
  return ({int(t): i for i, t in enumerate(sg.InputsAsNumpy())},
          {int(t): i for i, t in enumerate(sg.OutputsAsNumpy())})


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
