"""Read a ``.tflite`` flatbuffer: ops, tensors, dtypes, quantization,
whether the model is full-integer, and which ops LiteRT's XNNPACK delegate
leaves to the (slower) builtin kernels."""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any

import numpy as np

from qlite.errors import TFLiteFormatError

FLOAT_TYPES = frozenset({"FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16"})


@dataclasses.dataclass
class TensorInfo:
  """One tensor of a ``.tflite`` model, as :func:`inspect_tflite` reads it.

  Attributes:
    index: the tensor's index in the subgraph (what :class:`OpInfo` and
      ``TFLiteRunner.tensor`` use).
    name: the tensor name (the JAX name stack, e.g.
      ``"jit(f)/Dense_0/dot_general1"``, or a signature name).
    dtype: the LiteRT type name: ``"INT8"``, ``"INT32"``, ``"FLOAT32"``, ...
    shape: the static shape.
    scale: the quantization scales (one per tensor, or one per index along
      ``quantized_dimension``); None when the tensor is not quantized.
    zero_point: the zero points matching ``scale``; None when not quantized.
    quantized_dimension: the channel axis of per-channel scales.
    is_constant: True when the file holds the tensor's data (weights,
      biases).

  Example:
    >>> t = qlite.inspect_tflite(blob).tensors[2]   # blob: a Dense(4) export
    >>> t.dtype, t.shape, t.is_constant, t.per_channel
    ('INT8', (4, 8), True, True)
  """
  index: int
  name: str
  dtype: str                         # "INT8", "FLOAT32", ...
  shape: tuple[int, ...]
  scale: np.ndarray | None           # None when not quantized
  zero_point: np.ndarray | None
  quantized_dimension: int
  is_constant: bool

  @property
  def per_channel(self) -> bool:
    """True when the tensor has one scale per channel (more than one)."""
    return self.scale is not None and self.scale.size > 1


@dataclasses.dataclass
class OpInfo:
  """One operator of a ``.tflite`` model, as :func:`inspect_tflite` reads it.

  Attributes:
    index: the op's position in execution order.
    name: the builtin op name, e.g. ``"CONV_2D"`` (``"CUSTOM:<code>"`` for a
      custom op).
    inputs: indices of its input tensors (-1: an omitted optional input).
    outputs: indices of its output tensors.

  Example:
    >>> [op.name for op in qlite.inspect_tflite(blob).ops]  # a Dense(4) export
    ['QUANTIZE', 'FULLY_CONNECTED', 'DEQUANTIZE']
  """
  index: int
  name: str                          # builtin name, e.g. "CONV_2D"
  inputs: tuple[int, ...]
  outputs: tuple[int, ...]


@dataclasses.dataclass
class TFLiteInfo:
  """The ops, tensors and interface of a ``.tflite`` model (its first subgraph).

  What :func:`inspect_tflite` returns.

  Attributes:
    size_bytes: the size of the flatbuffer in bytes.
    ops: every :class:`OpInfo`, in execution order.
    tensors: every :class:`TensorInfo`, by index.
    inputs: tensor indices of the model inputs, in signature order.
    outputs: tensor indices of the model outputs, in signature order.
    float_ops: the ops that read or write a float tensor (a QUANTIZE of a
      float model input and a DEQUANTIZE to a float model output excepted);
      empty for a full-integer model.
    signatures: ``{name: (input_names, output_names)}`` of every signature
      def, in file order, names in each subgraph's input / output order
      (e.g. ``{"prefill": (["tokens", "length", ...], ["logits", ...]),
      "decode": ...}`` for a multi-signature LM); the ops and tensors above
      are those of the first subgraph.
    data: the flatbuffer's bytes (what :attr:`delegation` loads).
    delegation: which ops XNNPACK runs and which it leaves to LiteRT's
      builtin kernels (:class:`~qlite.litert.inspect.DelegationInfo`,
      computed on first use).

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> rules = [qlite.QuantizationRule()]
    >>> stats = qlite.calibrate(model, rules, [x, -x], variables=variables,
    ...                         progress=False)
    >>> blob = qlite.export_tflite(model, rules, stats, x, variables=variables)
    >>> info = qlite.inspect_tflite(blob)
    >>> info.full_integer, info.op_histogram
    (True, {'QUANTIZE': 1, 'FULLY_CONNECTED': 1, 'DEQUANTIZE': 1})
    >>> info.tensor(info.inputs[0]).dtype
    'FLOAT32'
  """
  size_bytes: int
  ops: list[OpInfo]
  tensors: list[TensorInfo]
  inputs: list[int]
  outputs: list[int]
  float_ops: list[OpInfo]            # compute ops on float tensors
  signatures: dict = dataclasses.field(default_factory=dict)
  # the flatbuffer, for :attr:`delegation` (None: built by hand)
  data: bytes | None = dataclasses.field(default=None, repr=False,
                                         compare=False)
  _delegation: Any = dataclasses.field(default=None, init=False, repr=False,
                                       compare=False)

  @property
  def delegation(self) -> "DelegationInfo":
    """Which ops LiteRT's XNNPACK delegate runs and which it leaves to the
    builtin kernels (:class:`DelegationInfo`).

    Computed on first use (it loads the model in a LiteRT ``Interpreter``
    with its default XNNPACK delegate, as a phone's CPU would run it), then
    kept. XNNPACK silently leaves the ops it does not support in that form
    (e.g. an int8 SOFTMAX, RSQRT, an int8 BATCH_MATMUL whose right-hand
    side has a non-zero zero point) to LiteRT's builtin kernels, which can
    be an order of magnitude slower.

    Raises:
      TFLiteFormatError: the info was not read from a model
        (:attr:`data` is None).

    Example:
      >>> info.delegation.summary()   # info: the class example's
      'XNNPACK: 3/3 ops delegated in 1 partition'
    """
    if self._delegation is None:
      if self.data is None:
        raise TFLiteFormatError("this TFLiteInfo holds no model bytes: "
                                "use qlite.inspect_tflite(model).delegation")
      self._delegation = xnnpack_delegation(self.data, info=self)
    return self._delegation

  @property
  def op_histogram(self) -> dict[str, int]:
    """``{op name: count}`` over :attr:`ops`, in order of first use."""
    return dict(collections.Counter(op.name for op in self.ops))

  @property
  def full_integer(self) -> bool:
    """True when every op runs on integer tensors (a QUANTIZE of a float model
    input and a DEQUANTIZE to a float model output excepted)."""
    return not self.float_ops

  def tensor(self, index: int) -> TensorInfo:
    """Returns the :class:`TensorInfo` of tensor ``index``.

    Args:
      index: a tensor index (from :attr:`inputs`, :attr:`outputs` or an
        :class:`OpInfo`).

    Returns:
      ``tensors[index]``.

    Raises:
      IndexError: no tensor has that index.

    Example:
      >>> info.tensor(info.outputs[0]).dtype   # info: the class example's
      'FLOAT32'
    """
    return self.tensors[index]

  def summary(self) -> str:
    """Returns a short text: size, op histogram, io dtypes, float ops.

    Returns:
      One line each for the size, the op histogram, the inputs and outputs
      (name and dtype) and ``full_integer``, then one per float op.

    Example:
      >>> print(info.summary())   # info: the class example's
      size: ... bytes
      ops (3): DEQUANTIZE×1, FULLY_CONNECTED×1, QUANTIZE×1
      inputs: serving_default_input_0:FLOAT32
      outputs: serving_default_output_0_output:FLOAT32
      full_integer: True
    """
    hist = ", ".join(f"{k}×{v}" for k, v in sorted(self.op_histogram.items()))
    io_in = ", ".join(f"{self.tensors[i].name}:{self.tensors[i].dtype}"
                      for i in self.inputs)
    io_out = ", ".join(f"{self.tensors[i].name}:{self.tensors[i].dtype}"
                       for i in self.outputs)
    lines = [f"size: {self.size_bytes} bytes", f"ops ({len(self.ops)}): {hist}",
             f"inputs: {io_in}", f"outputs: {io_out}",
             f"full_integer: {self.full_integer}"]
    for op in self.float_ops:
      outs = ", ".join(self.tensors[i].name for i in op.outputs)
      lines.append(f"  float op: {op.name} -> {outs}")
    return "\n".join(lines)


@dataclasses.dataclass
class DelegationInfo:
  """How LiteRT's XNNPACK delegate splits a ``.tflite`` model: the ops it
  runs (in partitions, one ``DELEGATE`` node each) and the ops it leaves to
  LiteRT's builtin kernels.

  What :attr:`TFLiteInfo.delegation` returns (first subgraph). XNNPACK
  takes an op only in the forms it supports, and says nothing about the
  others: the builtin kernels run them, often much slower (measured on
  x86 with ai-edge-litert 2.3.0: an int8 BATCH_MATMUL whose right-hand
  side has a non-zero zero point 1.79 ms vs 0.07 ms delegated at
  6x196x196x64; an int8 SOFTMAX 0.47 ms vs 0.07 ms in float). Each
  partition boundary also costs a hand-over between the two runtimes.

  Attributes:
    num_ops: the model's ops (subgraph 0, ``DELEGATE`` nodes not counted).
    num_partitions: the XNNPACK partitions (``DELEGATE`` nodes).
    builtin_ops: the :class:`OpInfo` of every op XNNPACK left to the
      builtin kernels, in execution order; empty when fully delegated.
    tensors: the model's tensors (:attr:`TFLiteInfo.tensors`), for
      :meth:`details`.
    error: why XNNPACK refused the whole model (it then runs on the builtin
      kernels only), else None.

  Example:
    >>> # blob: int8 attention logits q @ k^T then a softmax
    >>> d = qlite.inspect_tflite(blob).delegation
    >>> d.builtin_histogram, d.fully_delegated
    ({'SOFTMAX': 1}, False)
    >>> d.summary()
    'XNNPACK: 9/10 ops delegated in 2 partitions; builtin: SOFTMAX x1'
    >>> d.details()
    ["op 8 SOFTMAX: in INT8[1,2,8,8] zp -23 s 0.0525 'jit(f)/bqhd,bkhd->bhqk/dot_general4' -> out INT8[1,2,8,8] zp -128 s 0.00391 'jit(f)/composite1'"]
  """
  num_ops: int
  num_partitions: int
  builtin_ops: list[OpInfo]
  tensors: list[TensorInfo] = dataclasses.field(default_factory=list,
                                                repr=False)
  error: str | None = None

  @property
  def num_delegated(self) -> int:
    """How many ops XNNPACK runs."""
    return self.num_ops - len(self.builtin_ops)

  @property
  def fully_delegated(self) -> bool:
    """True when XNNPACK runs every op."""
    return not self.builtin_ops and self.error is None

  @property
  def builtin_histogram(self) -> dict[str, int]:
    """``{op name: count}`` of :attr:`builtin_ops`, most frequent first."""
    return dict(collections.Counter(
        op.name for op in self.builtin_ops).most_common())

  def summary(self) -> str:
    """One line, e.g. ``"XNNPACK: 506/559 ops delegated in 54 partitions;
    builtin: RSQRT x25, SOFTMAX x12"``."""
    part = "partition" if self.num_partitions == 1 else "partitions"
    line = (f"XNNPACK: {self.num_delegated}/{self.num_ops} ops delegated in "
            f"{self.num_partitions} {part}")
    if self.error is not None:
      line += f" (XNNPACK refused the model: {self.error.strip()[:200]})"
    if self.builtin_ops:
      line += "; builtin: " + ", ".join(
          f"{k} x{v}" for k, v in self.builtin_histogram.items())
    return line

  def details(self) -> list[str]:
    """One line per op left to the builtin kernels: its index, name and its
    input / output tensors (name, dtype, shape, zero point and scale of a
    per-tensor quantized one; ``const`` for weights), as in the class
    example."""
    return [f"op {op.index} {op.name}: in "
            + ", ".join(self._tensor(i) for i in op.inputs if i >= 0)
            + " -> out " + ", ".join(self._tensor(i) for i in op.outputs)
            for op in self.builtin_ops]

  def _tensor(self, i: int) -> str:
    if i >= len(self.tensors):
      return f"#{i}"
    t = self.tensors[i]
    q = ""
    if t.scale is not None and t.scale.size == 1:
      q = f" zp {int(t.zero_point[0])} s {float(t.scale[0]):.3g}"
    elif t.scale is not None:
      q = f" per-channel[{t.scale.size}]"
    const = " const" if t.is_constant else ""
    return (f"{t.dtype}[{','.join(str(d) for d in t.shape)}]{q}{const} "
            f"{t.name!r}")


def xnnpack_delegation(model: Any, info: "TFLiteInfo | None" = None
                       ) -> DelegationInfo:
  """Which ops of a ``.tflite`` model LiteRT's XNNPACK delegate runs.

  Loads the model in an ``ai_edge_litert`` ``Interpreter`` with its default
  delegate (XNNPACK) and reads its nodes: each partition XNNPACK takes is
  one ``DELEGATE`` node; walking back from a ``DELEGATE`` node's outputs to
  its inputs through the ops producing them gives the ops it replaced.
  Every other op runs on LiteRT's builtin kernels.

  Args:
    model: a path or the bytes of a ``.tflite`` file.
    info: the model's :class:`TFLiteInfo` when already read (its ops and
      tensors name the builtin ops).

  Returns:
    A :class:`DelegationInfo` (what :attr:`TFLiteInfo.delegation` returns).

  Raises:
    TFLiteFormatError: as :func:`inspect_tflite`, or LiteRT cannot load the
      model even without XNNPACK.
  """
  import warnings
  from ai_edge_litert.interpreter import Interpreter, OpResolverType
  data = _read_bytes(model)
  if info is None:
    info = inspect_tflite(data)
  error = None
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      it = Interpreter(model_content=data, num_threads=1)
      it.allocate_tensors()
    except (RuntimeError, ValueError) as e:
      # XNNPACK refuses some degenerate shapes (TFLiteRunner falls back to
      # the builtin kernels as well).
      error = str(e)
      try:
        it = Interpreter(
            model_content=data, num_threads=1,
            experimental_op_resolver_type=(
                OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
        it.allocate_tensors()
      except (RuntimeError, ValueError) as e2:
        raise TFLiteFormatError(f"LiteRT cannot load the model: {e2}") \
            from None
    nodes = it._get_ops_details()
  delegates = [n for n in nodes if n["op_name"] == "DELEGATE"]
  ops = {int(n["index"]): n for n in nodes if n["op_name"] != "DELEGATE"}
  producer = {int(t): i for i, n in ops.items() for t in n["outputs"]}
  covered: set[int] = set()
  for d in delegates:
    boundary = {int(t) for t in d["inputs"]}
    stack = [producer[int(t)] for t in d["outputs"] if int(t) in producer]
    while stack:
      i = stack.pop()
      if i in covered:
        continue
      covered.add(i)
      stack.extend(producer[int(t)] for t in ops[i]["inputs"]
                   if int(t) >= 0 and int(t) not in boundary
                   and int(t) in producer)
  builtin = []
  for i in sorted(set(ops) - covered):
    n = ops[i]
    op = info.ops[i] if i < len(info.ops) else None
    if op is None or op.name.split(":")[0] != n["op_name"]:
      op = OpInfo(i, n["op_name"], tuple(int(t) for t in n["inputs"]),
                  tuple(int(t) for t in n["outputs"]))
    builtin.append(op)
  return DelegationInfo(len(ops), len(delegates), builtin, info.tensors,
                        error)


def _enum_names(cls) -> dict[int, str]:
  return {v: k for k, v in vars(cls).items()
          if not k.startswith("_") and isinstance(v, int)}


def _read_bytes(model: Any) -> bytes:
  if isinstance(model, (bytes, bytearray, memoryview)):
    return bytes(model)
  if isinstance(model, (str, os.PathLike)):
    path = os.fspath(model)
    if not os.path.exists(path):
      raise TFLiteFormatError(f"inspect_tflite: no such file {path!r}")
    if os.path.isdir(path):
      raise TFLiteFormatError(f"inspect_tflite: {path!r} is a directory, "
                              f"not a .tflite file")
    with open(path, "rb") as f:
      return f.read()
  raise TFLiteFormatError(f"inspect_tflite takes a path or bytes, got "
                          f"{type(model).__name__}")


def inspect_tflite(model: Any) -> TFLiteInfo:
  """Reads a ``.tflite`` model: its ops, tensors, dtypes and quantization.

  Args:
    model: a path (``str`` or ``os.PathLike``) or the bytes of a ``.tflite``
      file (e.g. what :func:`qlite.export_tflite` returns).

  Returns:
    A :class:`TFLiteInfo` of the model's first subgraph.

  Raises:
    TFLiteFormatError: no such file, a directory, an argument that is
      neither a path nor bytes, or data that is not a TFLite flatbuffer
      (no ``TFL3`` identifier, corrupt or truncated).

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> _ = qlite.export_float_tflite(model, x, variables=variables,
    ...                               path="float.tflite")
    >>> info = qlite.inspect_tflite("float.tflite")
    >>> info.full_integer, [op.name for op in info.float_ops]
    (False, ['FULLY_CONNECTED'])
  """
  from ai_edge_litert import schema_py_generated as schema
  data = _read_bytes(model)
  if len(data) < 8 or data[4:8] != b"TFL3":
    raise TFLiteFormatError(
        f"not a .tflite model ({len(data)} bytes, missing the 'TFL3' "
        f"flatbuffer identifier)")
  try:
    m = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    ops_names = _enum_names(schema.BuiltinOperator)
    type_names = _enum_names(schema.TensorType)
    opcodes = []
    for oc in m.operatorCodes:
      code = max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode))
      name = ops_names.get(code, f"BUILTIN_{code}")
      if name == "CUSTOM":
        name = f"CUSTOM:{(oc.customCode or b'').decode(errors='replace')}"
      opcodes.append(name)
    sg = m.subgraphs[0]
    tensors = []
    for i, t in enumerate(sg.tensors):
      q = t.quantization
      scale = zp = None
      qdim = 0
      if q is not None and q.scale is not None and len(q.scale) > 0:
        scale = np.asarray(q.scale, np.float32)
        zp = np.asarray(q.zeroPoint if q.zeroPoint is not None else
                        np.zeros_like(scale), np.int64)
        qdim = int(q.quantizedDimension)
      buf = m.buffers[t.buffer] if 0 < t.buffer < len(m.buffers) else None
      const = buf is not None and ((buf.data is not None and len(buf.data) > 0)
                                   or (getattr(buf, "size", 0) or 0) > 0)
      name = t.name.decode(errors="replace") if isinstance(t.name, bytes) \
          else str(t.name)
      tensors.append(TensorInfo(
          i, name, type_names.get(int(t.type), str(t.type)),
          tuple(int(d) for d in (t.shape if t.shape is not None else ())),
          scale, zp, qdim, const))
    ops = [OpInfo(i, opcodes[op.opcodeIndex],
                  tuple(int(x) for x in (op.inputs if op.inputs is not None
                                         else ())),
                  tuple(int(x) for x in (op.outputs if op.outputs is not None
                                         else ())))
           for i, op in enumerate(sg.operators or [])]
    inputs = [int(i) for i in sg.inputs]
    outputs = [int(i) for i in sg.outputs]
    signatures = _signature_defs(m)
  except TFLiteFormatError:
    raise
  except Exception as e:
    raise TFLiteFormatError(f"corrupt or truncated .tflite model "
                            f"({len(data)} bytes): {type(e).__name__}: {e}") \
        from None
  float_ops = _float_ops(ops, tensors, set(inputs), set(outputs))
  return TFLiteInfo(len(data), ops, tensors, inputs, outputs, float_ops,
                    signatures, data)


def _signature_defs(m) -> dict:
  """``{name: (input_names, output_names)}``, each list in the order of its
  subgraph's inputs / outputs (the file stores the defs sorted by name)."""
  out = {}
  for sd in m.signatureDefs or []:
    sg = m.subgraphs[int(sd.subgraphIndex)]
    key = sd.signatureKey.decode() if isinstance(sd.signatureKey, bytes) \
        else str(sd.signatureKey)
    lists = []
    for defs, order in ((sd.inputs, sg.inputs), (sd.outputs, sg.outputs)):
      pos = {int(t): i for i, t in enumerate(order if order is not None
                                             else ())}
      named = sorted(defs or [], key=lambda d: pos.get(int(d.tensorIndex),
                                                       1 << 30))
      lists.append([d.name.decode() if isinstance(d.name, bytes)
                    else str(d.name) for d in named])
    out[key] = tuple(lists)
  return out


def _float_ops(ops, tensors, model_inputs, model_outputs) -> list[OpInfo]:
  out = []
  for op in ops:
    ins = [i for i in op.inputs if i >= 0]
    if op.name == "QUANTIZE" and all(i in model_inputs for i in ins):
      continue
    if op.name == "DEQUANTIZE" and all(o in model_outputs for o in op.outputs) \
        and not any(tensors[i].is_constant for i in ins):
      continue
    if any(tensors[i].dtype in FLOAT_TYPES for i in ins + list(op.outputs)):
      out.append(op)
  return out


def tensor_module_path(tensor_name: str) -> tuple[str, str]:
  """Maps a LiteRT tensor name (JAX name stack, e.g.
  ``jit(f)/Conv_0/conv_general_dilated``) to ``(module_path, op)``."""
  name = tensor_name.split(";")[-1]
  parts = [p for p in name.split("/") if p]
  if parts and parts[0].startswith("jit("):
    parts = parts[1:]
  if not parts:
    return "", ""
  op = parts[-1].rstrip("0123456789")
  return "/".join(parts[:-1]), op


def float_islands(info, graph=None) -> list[str]:
  """Returns one line per float compute op of an exported model.

  Each line names the LiteRT op, its jax op and module path and, when
  ``graph`` is given, the source line, e.g. ``"SIN (jax op `sin` in module
  `Block_0`, model.py:12 (Block.__call__))"``: what
  ``export_tflite(strict=True)`` reports.

  Args:
    info: the :class:`TFLiteInfo` of the model (:func:`inspect_tflite`).
    graph: the traced :class:`qlite.trace.graph.Graph` of the model, for
      source lines (optional).

  Returns:
    A list of strings; empty for a full-integer model.

  Example:
    >>> from qlite.litert.inspect import float_islands
    >>> float_islands(qlite.inspect_tflite(blob))   # blob: export_tflite's
    []
  """
  by_path = {}
  if graph is not None:
    for node in graph.nodes:
      by_path.setdefault((node.module_path, node.name), node.source)
  lines = []
  for op in info.float_ops:
    names = [info.tensors[i].name for i in op.outputs]
    path, prim = tensor_module_path(names[0]) if names else ("", "")
    src = by_path.get((path, prim), "")
    lines.append(f"{op.name} (jax op `{prim}` in module `{path or '<root>'}`"
                 f"{', ' + src if src else ''})")
  return lines


def float_island_message(info, graph) -> str:
  lines = float_islands(info, graph)
  # QUANTIZE / DEQUANTIZE only mark where an island starts and ends
  compute = [l for l in lines if not l.startswith(("QUANTIZE ", "DEQUANTIZE "))]
  return ("the converted model still computes in float: " +
          "; ".join(compute or lines) + ". Either no rule quantizes these "
          "ops' module (add a rule with act_qtype='int8' for it), or LiteRT "
          "has no int8 kernel for them (rewrite the op, or keep that module "
          "in float with a rule act_qtype=None and export with strict=False "
          "to accept the float islands).")
