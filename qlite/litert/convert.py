"""jax function -> StableHLO (jax.export) -> litert-converter -> .tflite bytes."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import tempfile
import threading
from typing import Callable, Sequence

import jax
import numpy as np

from qlite.core import stats as stats_lib
from qlite.errors import ConversionError, QliteError

IO_DTYPES = ("float32", "int8")
SIGNATURE = "serving_default"


def stablehlo_bytecode(fn: Callable,
                       avals: Sequence[jax.ShapeDtypeStruct]) -> bytes:
  """Returns ``jax.jit(fn)`` at ``avals`` as a serialized StableHLO portable
  artifact (``jax.export``'s bytecode).

  The converter reads it directly: no module text is printed and parsed
  (for a 64 MiB model the text is ~130 MiB of hex constants; bytecode
  deserializes ~30x faster than the text round trip).
  Raises:
    ConversionError: ``jax.export`` failed (e.g. a non-array value).
  """
  try:
    return bytes(jax.export.export(jax.jit(fn, keep_unused=True))(
        *avals).mlir_module_serialized)
  except QliteError:
    raise
  except Exception as e:
    raise ConversionError(f"jax.export of the model failed: "
                          f"{type(e).__name__}: {e}") from e


def stablehlo_text(fn: Callable, avals: Sequence[jax.ShapeDtypeStruct]) -> str:
  """Returns the StableHLO module text of ``jax.jit(fn)`` at ``avals`` (for
  reading; conversion uses :func:`stablehlo_bytecode`).

  Raises:
    ConversionError: ``jax.export`` failed (e.g. a non-array value).
  """
  try:
    return jax.export.export(jax.jit(fn))(*avals).mlir_module()
  except QliteError:
    raise
  except Exception as e:
    raise ConversionError(f"jax.export of the model failed: "
                          f"{type(e).__name__}: {e}") from e


@contextlib.contextmanager
def sigint_deferred():
  """Holds Ctrl-C (SIGINT) while native converter / LiteRT code runs and
  delivers it when the block ends (a KeyboardInterrupt, with Python's
  default handler).

  The native code never sees a KeyboardInterrupt half-way: a SIGINT while
  the converter's extension initialises made its import fail for the rest
  of the process ("Encountered an error while initializing the
  extension"), and one raised in a callback from native code can leave
  that code's state broken. The converter does not poll for signals, so
  holding SIGINT delays nothing: it is raised when the call returns, with
  the converter's MLIR objects already released. A no-op outside the main
  thread or where Python does not own SIGINT's handler.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  old = signal.getsignal(signal.SIGINT)
  if old is None:                 # installed outside Python: leave it
    yield
    return
  pending = []
  signal.signal(signal.SIGINT, lambda signum, frame: pending.append(frame))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, old)
    if pending:
      if callable(old):
        old(signal.SIGINT, pending[0])   # default: raises KeyboardInterrupt
      elif old == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGINT)


class SigintWatch:
  """Counts Ctrl-C (SIGINT) over a block and raises KeyboardInterrupt for
  each, as Python's default handler does; :meth:`check` raises
  KeyboardInterrupt when one came, even if the exception was swallowed
  (jax prints and ignores an exception raised in its gc callback: the
  interrupted export then ran on and wrote its file).

  Use: ``with SigintWatch() as watch: blob = export(...); watch.check();
  write_atomic(path, blob)``. Installs itself only in the main thread over
  Python's default handler (else it watches nothing and check() passes).
  """

  def __init__(self):
    self.count = 0
    self._old = None

  def __call__(self, signum, frame):
    self.count += 1
    raise KeyboardInterrupt

  def check(self) -> None:
    """Raises KeyboardInterrupt if a SIGINT came since the block began."""
    if self.count:
      raise KeyboardInterrupt

  def __enter__(self) -> "SigintWatch":
    if threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler:
      self._old = signal.signal(signal.SIGINT, self)
    return self

  def __exit__(self, *exc) -> bool:
    if self._old is not None:
      signal.signal(signal.SIGINT, self._old)
      self._old = None
    return False


def convert_stablehlo(module: bytes | str | list, input_names: Sequence[str],
                      output_names: Sequence[str], *, quantized: bool,
                      weights: Sequence[np.ndarray] = ()) -> bytes:
  """Converts a StableHLO module to ``.tflite`` flatbuffer bytes.

  Ctrl-C during the conversion is held until the converter returns and
  has released its objects (:func:`sigint_deferred`), then raised as a
  KeyboardInterrupt.

  ``module``: a portable artifact (bytes, :func:`stablehlo_bytecode`) or
  module text (str, :func:`stablehlo_text`), or a one-item list holding
  either (the item is taken out and freed as soon as it is parsed).
  ``quantized`` selects the converter's strict static QDQ mode (the ``quant.fake_quant`` composites
  become int8 tensors). ``weights``: values of the module's last
  ``len(weights)`` arguments, which become constants inside the converter
  (see :func:`convert_function`).
  Raises:
    ConversionError: the converter rejected the module.
  """
  with sigint_deferred():
    # The call's frame (its MLIR context and module) is gone before a held
    # KeyboardInterrupt is raised.
    return _convert_stablehlo(module, input_names, output_names,
                              quantized=quantized, weights=weights)


def _convert_stablehlo(module, input_names, output_names, *, quantized,
                       weights) -> bytes:
  from litert_converter import _stablehlo
  from litert_converter import converter_api_ext as capi
  from litert_converter.mlir import ir, passmanager
  # A one-item list hands the caller's only reference over, so the
  # serialized module is freed once deserialized (convert_function: 1x the
  # weight bytes less at the converter's peak).
  if isinstance(module, list):
    module = module.pop()
  ctx = ir.Context()
  capi.prepare_mlir_context(ctx)
  try:
    with ctx:
      if isinstance(module, (bytes, bytearray)):
        data, module = module, None
        module = _stablehlo.deserialize_portable_artifact(ctx, bytes(data))
        del data
      else:
        module = ir.Module.parse(module)
      if len(weights):
        _bind_weights(module, weights)
      capi.set_signature(module.operation, SIGNATURE, list(input_names),
                         list(output_names))
      cfg = capi.ConvertToTFLConfig()
      if quantized:
        cfg.qdq_conversion_mode = "STATIC"
        cfg.strict_qdq_mode = True
        cfg.model_origin_framework = "JAX"
      else:
        cfg.qdq_conversion_mode = "NONE"
      capi.run_convert_to_tfl_passes(module, passmanager.PassManager(), cfg)
      blob = bytes(capi.export_flatbuffer_to_bytes(module.operation))
  except Exception as e:
    raise ConversionError(f"litert-converter failed: {type(e).__name__}: "
                          f"{e}") from e
  return int16_rewrites(blob) if quantized else blob


# Ops whose 16x8 kernels (int16 input, int8 weights) read an int64 bias
# (input index 2); the converter emits int32 ones.
_BIAS_OPS = {"FULLY_CONNECTED": 2, "CONV_2D": 2, "DEPTHWISE_CONV_2D": 2,
             "TRANSPOSE_CONV": 3}
_INT32_LIMITS = (-(1 << 31), (1 << 31) - 1)


def int16_rewrites(blob: bytes) -> bytes:
  """The 16x8 fix-ups of a converted model that holds int16 tensors
  (:func:`int16_biases_to_int64`, :func:`fuse_requantize`); ``blob``
  unchanged (the same bytes) when it has none, as every int8 export."""
  from ai_edge_litert import schema_py_generated as schema
  if not _has_int16_tensor(blob, schema):
    return blob
  return fuse_requantize(int16_biases_to_int64(blob))


def fuse_requantize(blob: bytes) -> bytes:
  """Returns ``blob`` with every DEQUANTIZE -> QUANTIZE pair (a quantized
  tensor taken to float only to be quantized at another scale or width)
  replaced by one QUANTIZE from the integer tensor (LiteRT requantizes
  int8 <-> int16 in integers).

  The converter folds two adjacent fake-quant boundaries into one, so the
  fake-quant model puts an optimization barrier between an int16 value and
  its int8 copy (mixed regions, ``ConversionProvider``); the converter then
  leaves this float pair. The float tensor must feed only QUANTIZE ops and
  not be a model output."""
  from ai_edge_litert.tools import flatbuffer_utils as fbu
  model = fbu.read_model_from_bytearray(bytearray(blob))
  names = {i: fbu.opcode_to_name(model, i)
           for i in range(len(model.operatorCodes))}
  changed = False
  for sg in model.subgraphs:
    readers: dict[int, list] = {}
    for op in sg.operators:
      for t in op.inputs:
        readers.setdefault(int(t), []).append(op)
    outputs = {int(t) for t in sg.outputs}
    drop = []
    for op in sg.operators:
      if names[op.opcodeIndex] != "DEQUANTIZE":
        continue
      src, mid = int(op.inputs[0]), int(op.outputs[0])
      users = readers.get(mid, [])
      if mid in outputs or not users or any(
          names[u.opcodeIndex] != "QUANTIZE" for u in users):
        continue
      if sg.tensors[src].quantization is None or \
          sg.tensors[src].buffer and model.buffers[sg.tensors[src].buffer] \
          .data is not None:
        continue              # a constant: left to the converter's form
      for u in users:
        u.inputs = np.array([src if int(t) == mid else int(t)
                             for t in u.inputs], np.int32)
      drop.append(op)
    if drop:
      sg.operators = [op for op in sg.operators
                      if not any(op is d for d in drop)]
      changed = True
  if not changed:
    return blob
  return bytes(fbu.convert_object_to_bytearray(model))


def int16_biases_to_int64(blob: bytes) -> bytes:
  """Returns ``blob`` with the bias of every conv / fully-connected op
  that reads an int16 input stored as int64, as LiteRT's 16x8 kernels
  require (DEPTHWISE_CONV_2D refuses an int32 one at prepare; the others
  take int64 as their canonical 16x8 form). The values and scales are the
  converter's (an int32 code is exact in int64).

  Raises:
    ConversionError: a bias code the converter saturated at the int32
      limits (bias / (input scale * weight scale) does not fit: its float
      value is lost), naming the tensor.
  """
  from ai_edge_litert import schema_py_generated as schema
  from ai_edge_litert.tools import flatbuffer_utils as fbu
  model = fbu.read_model_from_bytearray(bytearray(blob))
  int16, int32, int64 = (schema.TensorType.INT16, schema.TensorType.INT32,
                         schema.TensorType.INT64)
  names = {i: fbu.opcode_to_name(model, i)
           for i in range(len(model.operatorCodes))}
  changed = False
  for sg in model.subgraphs:
    for op in sg.operators:
      slot = _BIAS_OPS.get(names[op.opcodeIndex])
      if slot is None or len(op.inputs) <= slot or op.inputs[slot] < 0:
        continue
      if sg.tensors[op.inputs[0]].type != int16:
        continue
      bias = sg.tensors[op.inputs[slot]]
      if bias.type != int32:
        continue
      buf = model.buffers[bias.buffer]
      codes = np.frombuffer(bytes(bytearray(buf.data)), np.int32)
      if codes.size and (codes.min() <= _INT32_LIMITS[0]
                         or codes.max() >= _INT32_LIMITS[1]):
        name = bias.name.decode() if isinstance(bias.name, bytes) \
            else bias.name
        raise ConversionError(
            f"the int32 bias `{name}` of a 16x8 "
            f"{names[op.opcodeIndex]} saturates: bias / (input scale * "
            f"weight scale) does not fit in int32 with int16 activations; "
            f"keep that layer's activations int8 (a rule with "
            f"act_qtype='int8' for its module)")
      buf.data = np.frombuffer(codes.astype(np.int64).tobytes(), np.uint8)
      bias.type = int64
      changed = True
  if not changed:
    return blob
  return bytes(fbu.convert_object_to_bytearray(model))


def _has_int16_tensor(blob: bytes, schema) -> bool:
  """True when a tensor of ``blob`` is int16 (read without unpacking the
  weights: the int8 exports skip the rewrite at no cost)."""
  model = schema.Model.GetRootAs(blob, 0)
  for s in range(model.SubgraphsLength()):
    sg = model.Subgraphs(s)
    for t in range(sg.TensorsLength()):
      if sg.Tensors(t).Type() == schema.TensorType.INT16:
        return True
  return False


# Constants of at least this many bytes leave the jax.export'ed module as
# arguments and come back as constants inside the converter (below).
WEIGHT_ARG_MIN_BYTES = 1 << 12
_WEIGHT_DTYPES = (np.float32, np.int8, np.int32)


def _hoist_weights(fn: Callable, avals: Sequence[jax.ShapeDtypeStruct]):
  """Returns ``(fn2, weights)``: ``fn2(*args, *weights) == fn(*args)``,
  with the large array constants of ``fn``'s jaxpr as trailing arguments.

  jax.export turns every constant into an MLIR attribute, then bytecode,
  then a portable artifact (deserialized, converted and written again):
  for a 64 MiB model its peak was ~7x the weight bytes, as much as the
  whole float conversion. As arguments the weights cost nothing there, and
  the converter gets them straight from their numpy buffers."""
  try:
    closed = jax.make_jaxpr(fn)(*avals)
  except QliteError:
    raise
  except Exception as e:
    raise ConversionError(f"jax.export of the model failed: "
                          f"{type(e).__name__}: {e}") from e
  consts = [np.asarray(c) for c in closed.consts]
  big = [i for i, c in enumerate(consts)
         if c.nbytes >= WEIGHT_ARG_MIN_BYTES and c.dtype in _WEIGHT_DTYPES]
  weights = [consts[i] for i in big]
  kept = [None if i in set(big) else c for i, c in enumerate(consts)]
  n_args = len(avals)
  jaxpr = closed.jaxpr

  def fn2(*flat):
    values = list(kept)
    for i, w in zip(big, flat[n_args:]):
      values[i] = w
    return jax.core.eval_jaxpr(jaxpr, values, *flat[:n_args])
  # jit(<name>) prefixes the converted tensor names: keep fn's
  fn2.__name__ = fn2.__qualname__ = getattr(fn, "__name__", "fn")
  return fn2, weights


def _bind_weights(module, weights: Sequence[np.ndarray]) -> None:
  """Replaces the last ``len(weights)`` arguments of ``main`` by
  ``stablehlo.constant`` ops holding ``weights`` (converter's context)."""
  from litert_converter.mlir.dialects import stablehlo as shlo
  from litert_converter.mlir import ir
  main = next(op for op in module.body.operations
              if ir.StringAttr(op.attributes["sym_name"]).value == "main")
  block = main.regions[0].blocks[0]
  first = len(block.arguments) - len(weights)
  if first < 0:
    raise ConversionError("internal: fewer module arguments than weights")
  with ir.InsertionPoint.at_block_begin(block), ir.Location.unknown():
    for i, w in enumerate(weights):
      const = shlo.ConstantOp(ir.DenseElementsAttr.get(
          np.ascontiguousarray(w)))
      block.arguments[first + i].replace_all_uses_with(const.result)
  for i in reversed(range(first, len(block.arguments))):
    block.erase_argument(i)
  ftype = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value)
  main.attributes["function_type"] = ir.TypeAttr.get(ir.FunctionType.get(
      list(ftype.inputs)[:first], list(ftype.results)))
  if "arg_attrs" in main.attributes:
    attrs = ir.ArrayAttr(main.attributes["arg_attrs"])
    main.attributes["arg_attrs"] = ir.ArrayAttr.get(
        [attrs[i] for i in range(first)])


@functools.lru_cache(maxsize=None)
def _malloc_trim():
  try:
    return ctypes.CDLL(None).malloc_trim   # glibc
  except (AttributeError, OSError):
    return None


def release_heap() -> None:
  """Returns freed heap memory to the OS (glibc ``malloc_trim``; a no-op
  elsewhere). jax.export and the converter allocate from several threads'
  heaps, and memory they free stays in those heaps unless trimmed (measured
  while developing it: a 64 MiB model's export peaked at ~4.2x its weight
  bytes without, ~2.6x with; the current figure is the scaling table of
  ``bench/odml.py``)."""
  trim = _malloc_trim()
  if trim is not None:
    trim(0)


def _export_and_convert(fn: Callable | list,
                        avals: Sequence[jax.ShapeDtypeStruct],
                        input_names: Sequence[str] | None,
                        output_names: Sequence[str] | None,
                        num_outputs: int | None, *, quantized: bool,
                        weights_as_inputs: bool):
  """The body of :func:`convert_function` and
  :func:`convert_function_weights_as_inputs`: returns ``(blob, weights)``.

  ``fn`` may come in a one-item list: it is taken out and dropped once the
  module is serialized, so the constants it holds (e.g. folded weights) are
  freed before the converter's peak memory."""
  if isinstance(fn, list):
    fn = fn.pop()
  if num_outputs is None:
    num_outputs = len(jax.eval_shape(fn, *avals))
  fn, weights = _hoist_weights(fn, avals)
  n_in = len(avals) + (len(weights) if weights_as_inputs else 0)
  input_names = list(input_names or [f"input_{i}" for i in range(n_in)])
  output_names = list(output_names or
                      [f"output_{i}" for i in range(num_outputs)])
  w_avals = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights]
  module = [stablehlo_bytecode(fn, list(avals) + w_avals)]
  del fn
  release_heap()
  try:
    blob = convert_stablehlo(module, input_names, output_names,
                             quantized=quantized,
                             weights=() if weights_as_inputs else weights)
  finally:
    release_heap()
  return blob, weights


def convert_function(fn: Callable | list, avals: Sequence[jax.ShapeDtypeStruct],
                     *, quantized: bool,
                     input_names: Sequence[str] | None = None,
                     output_names: Sequence[str] | None = None,
                     num_outputs: int | None = None) -> bytes:
  """Returns the ``.tflite`` bytes of ``fn`` (flat arrays in, flat out).

  ``fn`` may come in a one-item list: it is taken out and dropped once the
  module is serialized, so the constants it holds (e.g. folded weights) are
  freed before the converter's peak memory."""
  return _export_and_convert(fn, avals, input_names, output_names,
                             num_outputs, quantized=quantized,
                             weights_as_inputs=False)[0]


def convert_function_weights_as_inputs(
    fn: Callable | list, avals: Sequence[jax.ShapeDtypeStruct], *,
    num_outputs: int) -> tuple[bytes, list[np.ndarray]]:
  """Float ``.tflite`` of ``fn`` whose large constants are model inputs
  after ``avals`` (``input_{len(avals) + j}``), and those constants.

  For calibration runs of large models: the converter then never holds the
  weights (the float conversion of a 64 MiB model peaked at ~5.9x its
  weight bytes: attributes, transposed copies, the flatbuffer), and LiteRT
  reads them from the inputs."""
  return _export_and_convert(fn, avals, None, None, num_outputs,
                             quantized=False, weights_as_inputs=True)


def set_int8_io(blob: bytes) -> bytes:
  """Returns ``blob`` with int8 model inputs and outputs (the float
  QUANTIZE / DEQUANTIZE at the interface removed).

  Raises:
    ConversionError: the model has no quantized interface to rewrite.
  """
  with sigint_deferred():
    return _set_int8_io(blob)


def _set_int8_io(blob: bytes) -> bytes:
  from ai_edge_litert import _pywrap_modify_model_interface as mmi
  int8 = 9   # TensorType.INT8
  with tempfile.TemporaryDirectory() as d:
    src, dst = os.path.join(d, "in.tflite"), os.path.join(d, "out.tflite")
    with open(src, "wb") as f:
      f.write(blob)
    status = mmi.modify_model_interface(src, dst, int8, int8)
    if status != 0 or not os.path.exists(dst):
      raise ConversionError(
          "io_dtype='int8': could not rewrite the model interface to int8 "
          "(the inputs / outputs must be float tensors that are quantized / "
          "dequantized right at the interface)")
    with open(dst, "rb") as f:
      return _fix_signatures(f.read())


def _fix_signatures(blob: bytes) -> bytes:
  """The interface modifier drops the float io tensors but leaves the
  signature defs pointing at them: point them at the new io tensors."""
  from ai_edge_litert.tools import flatbuffer_utils as fbu
  model = fbu.read_model_from_bytearray(bytearray(blob))
  sg = model.subgraphs[0]
  for sig in model.signatureDefs or []:
    for defs, ids in ((sig.inputs, sg.inputs), (sig.outputs, sg.outputs)):
      for d, t in zip(defs or [], ids):
        d.tensorIndex = int(t)
  return bytes(fbu.convert_object_to_bytearray(model))


def write_atomic(path: str | os.PathLike, data: bytes, *,
                 what: str = "export_tflite") -> str:
  """Writes ``data`` to ``path`` atomically; returns the path (a ``str``).

  A temporary file in the same directory is written, fsynced and renamed
  over ``path``; its mode follows the umask (0644 under umask 022) and an
  existing file keeps its mode (:func:`qlite.core.stats.write_atomic`).

  Raises:
    QliteError: ``path`` is not a ``str`` / ``os.PathLike`` (e.g. bytes),
      the directory is missing, ``path`` is a directory, or writing failed
      (permission denied, disk full...); nothing is left behind.
  """
  return stats_lib.write_atomic(path, lambda f: f.write(data),
                                what=what)
