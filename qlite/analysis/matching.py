"""Match the activation boundaries of a quantization plan to the LiteRT
tensors that carry them.

A boundary matches a non-constant integer tensor of the same shape with the
same quantization scale / zero point (a precise fingerprint) and, where the
converter kept it, the same JAX name stack (``jit(f)/Conv_0/conv_general_
dilated``, or fused ``a;b;c`` names). Model inputs match the input tensor (or
the QUANTIZE of it) at the same position.
"""

from __future__ import annotations

import collections
from typing import Any

from qlite.litert.inspect import tensor_module_path

__all__ = ["name_pairs", "same_scale", "match_tensors", "explorer_keys",
           "output_scale"]

_INT_DTYPES = {"INT8", "UINT8", "INT16", "INT32", "INT4"}


def name_pairs(tensor_name: str) -> set[tuple[str, str]]:
  """``(module_path, op)`` of every ``;``-separated part of a tensor name."""
  return {tensor_module_path(part) for part in tensor_name.split(";")}


def same_scale(t, scale: float, zp: int) -> bool:
  """Whether per-tensor-quantized ``t`` has ``scale`` (to 1e-6 relative) and
  zero point ``zp``."""
  return (t.scale is not None and t.scale.size == 1 and
          abs(float(t.scale[0]) - scale) <= 1e-6 * abs(scale) and
          int(t.zero_point[0]) == zp)


def match_tensors(info, graph, plan, scales) -> dict[Any, tuple[Any, str]]:
  """Finds the LiteRT tensor of every boundary of ``plan``.

  Args:
    info: the ``inspect_tflite`` view of the ``.tflite``.
    graph: the traced graph ``plan`` was made from.
    plan: the quantization plan; its ``boundaries`` are matched.
    scales: ``{boundary var: (scale array, zero point array)}``.

  Returns:
    ``{boundary var: (TensorInfo or None, how)}``: ``how`` says what matched
    (``name+shape+scale``, ...) and what is off, or why nothing matched.
  """
  producer = {}
  for op in info.ops:
    for o in op.outputs:
      producer[o] = op
  model_inputs = list(info.inputs)

  def input_position(t) -> int | None:
    """The model input a tensor carries (itself, or a QUANTIZE of it)."""
    if t.index in model_inputs:
      return model_inputs.index(t.index)
    op = producer.get(t.index)
    if op is not None and op.name == "QUANTIZE" and op.inputs and \
        op.inputs[0] in model_inputs:
      return model_inputs.index(op.inputs[0])
    return None

  acts = [t for t in info.tensors if not t.is_constant and
          t.dtype in _INT_DTYPES and t.scale is not None and t.scale.size == 1]
  arg_pos = {v: i for i, v in enumerate(graph.arg_vars)}
  taken: dict[int, str] = {}       # tensor index -> first boundary key
  out = {}
  for var, b in plan.boundaries.items():
    shape = tuple(int(d) for d in graph.avals[var].shape)
    s, z = scales[var]
    scale, zp = float(s[0]), int(z[0])

    def name_score(t):
      if var in arg_pos:
        return 2 if input_position(t) == arg_pos[var] else 0
      pairs = name_pairs(t.name)
      if (b.module_path, b.op) in pairs:
        return 2
      if b.module_path and any(p == b.module_path for p, _ in pairs):
        return 1
      return 0

    best, best_key = None, None
    for t in acts:
      if tuple(t.shape) != shape:
        continue
      same, score = same_scale(t, scale, zp), name_score(t)
      if not same and score == 0:
        continue
      op = producer.get(t.index)
      key = (same, score, t.index not in taken,
             -(op.index if op is not None else -1))
      if best_key is None or key > best_key:
        best, best_key = t, key
    if best is None:
      out[var] = (None, f"no LiteRT tensor of shape {shape} with scale "
                        f"{scale:.6g} / zero point {zp} or named after "
                        f"`{b.module_path or b.key}/{b.op}` (the converter "
                        f"fused or folded it away, or the .tflite was "
                        f"exported with other stats)", False)
      continue
    same, score = best_key[0], best_key[1]
    how = "+".join(w for w, ok in (("name", score == 2),
                                   ("module", score == 1),
                                   ("shape", True), ("scale", same)) if ok)
    if not same:
      how += (f" (SCALE DIFFERS: .tflite {float(best.scale[0]):.6g} vs "
              f"stats {scale:.6g}: exported with other stats?)")
    if best.index in taken:
      how += f" (shares the tensor of `{taken[best.index]}`: fused)"
    taken.setdefault(best.index, b.key)
    out[var] = (best, how, same)
  return _drop_fused(plan, out)


def _drop_fused(plan, out) -> dict[Any, tuple[Any, str]]:
  """A tensor matched by several boundaries carries the value of those whose
  scale it has: a boundary matched by name only, on a tensor whose scale
  another boundary has, was fused into that boundary's op (``x - c`` into
  ``relu(x - c)``'s SUB with a fused RELU) and has no tensor of its own."""
  owner = {}
  for var, (t, _, same) in out.items():
    if t is not None and same:
      owner.setdefault(t.index, plan.boundaries[var].key)
  result = {}
  for var, (t, how, same) in out.items():
    if t is not None and not same and t.index in owner:
      result[var] = (None, f"fused: LiteRT tensor #{t.index} carries "
                           f"`{owner[t.index]}` (its scale), this value "
                           f"exists only inside that op")
    else:
      result[var] = (t, how)
  return result


def explorer_keys(info, matched: dict[Any, tuple[Any, str]]
                  ) -> dict[Any, str]:
  """Model Explorer node keys of the matched tensors.

  Returns:
    ``{boundary var: key}`` for every matched boundary: the tensor name when
    it is unique in the model (or the tensor has no producing op), else the
    producing op's index (its Model Explorer node id).
  """
  names = collections.Counter(t.name for t in info.tensors)
  producer = {o: op.index for op in info.ops for o in op.outputs}
  keys = {}
  for var, (t, _) in matched.items():
    if t is not None:
      keys[var] = t.name if names[t.name] == 1 or \
          t.index not in producer else str(producer[t.index])
  return keys


def output_scale(info, t_index: int) -> float | None:
  """The quantization scale of model output tensor ``t_index``: its own, or
  that of the tensor a DEQUANTIZE turns into it; None for a float output."""
  t = info.tensors[t_index]
  scale = None
  if t.scale is not None and t.scale.size == 1:
    scale = float(t.scale[0])
  else:
    for op in info.ops:
      if t_index in op.outputs and op.name == "DEQUANTIZE":
        src = info.tensors[op.inputs[0]]
        if src.scale is not None and src.scale.size == 1:
          scale = float(src.scale[0])
  return scale
