"""The LiteRT int8 op table: how each jax primitive a Flax model emits is
annotated for a full-integer LiteRT model.

Categories:
  * WEIGHTED: conv / dot_general with a constant operand. The constant is a
    weight: symmetric, narrow range, per output channel. The output gets an
    activation boundary unless it fuses into a following bias / activation.
  * PASS_THROUGH: ops LiteRT runs on int8 with the input's scale (reshape,
    transpose, slice, max pool...). No boundary of their own.
  * BIAS: add / sub of a constant right after a weighted op: LiteRT fuses it
    into conv / fully_connected as an int32 bias.
  * FUSED_ACTIVATION: relu / relu6 clamps that conv / fully_connected fuse.
  * FIXED_RANGE: ops whose int8 LiteRT kernels demand a fixed output scale.
  * SAME_SCALE: ops whose int8 LiteRT kernels demand that their activation
    inputs share the output's scale and zero point.
  * everything else with a float activation output: a compute op whose output
    gets a calibrated per-tensor boundary.
"""

from __future__ import annotations

import numpy as np

WEIGHTED = frozenset({"conv_general_dilated", "dot_general"})

PASS_THROUGH = frozenset({
    "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose",
    "slice", "dynamic_slice", "gather", "copy", "copy_p", "reduce_max",
    "reduce_min", "reduce_window_max", "reduce_window_min", "rev",
    "convert_element_type", "stop_gradient", "optimization_barrier",
})

BIAS = frozenset({"add", "sub"})
# Per-channel affine ops after conv / dot_general that the converter folds
# (bias add, BatchNorm's subtract-mean / multiply-scale / add-offset).
AFFINE = frozenset({"add", "sub", "mul", "div"})

# (lo, hi) so that asymmetric int8 gives LiteRT's required scale / zero point:
# logistic: scale 1/256, zp -128; tanh: scale 1/128, zp 0.
FIXED_RANGE = {
    "logistic": (0.0, 255.0 / 256.0),
    "tanh": (-1.0, 127.0 / 128.0),
    "odml.softmax": (0.0, 255.0 / 256.0),
}

# Ops whose LiteRT int8 kernels read every activation input at the output's
# scale and zero point: CONCATENATION, PAD, MAXIMUM / MINIMUM of two tensors
# (max / min with a constant are relu clamps or take a quantized constant)
# and AVERAGE_POOL_2D (reduce_window_sum scaled by a constant), and
# RESIZE_BILINEAR (the odml.upsample_bilinear2d composite). Where the
# scales differ the converter inserts a requantize (an int8 -> int8
# QUANTIZE) or moves the producer's output scale away from its boundary; the
# plan gives such an op and the boundaries feeding it one shared range.
SAME_SCALE = frozenset({"concatenate", "pad", "max", "min",
                        "reduce_window_sum", "odml.upsample_bilinear2d"})

# A reduction followed by a division / multiplication by a constant is one
# LiteRT op (MEAN, AVERAGE_POOL_2D): no boundary in between, constant left
# to the converter.
SUM_THEN_SCALE = frozenset({"reduce_sum", "reduce_window_sum"})
SCALE_BY_CONST = frozenset({"div", "mul"})

# Elementwise ops whose constant operands must be quantized per tensor (the
# converter leaves ADD/MUL/... in float when a constant operand is float).
COMPARE = frozenset({"ge", "gt", "le", "lt", "eq", "ne"})

ELEMENTWISE_WITH_CONST = COMPARE | frozenset({
    "add", "sub", "mul", "div", "max", "min", "pow", "select_n",
    "atan2", "rem", "clamp",
})


def weight_channel_axis(node, operand: int, ndim: int) -> int | None:
  """Returns the output-channel axis of the weight operand of a WEIGHTED
  node, or None when the weight has no single output-channel axis (it is then
  quantized per tensor)."""
  if node.name == "conv_general_dilated":
    dn = node.params["dimension_numbers"]
    return int(dn.rhs_spec[0]) if operand == 1 else None
  if node.name == "dot_general":
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    contract, batch = (lc, lb) if operand == 0 else (rc, rb)
    free = [d for d in range(ndim) if d not in contract and d not in batch]
    return free[0] if len(free) == 1 else None
  return None


def is_zero(value) -> bool:
  return value is not None and np.size(value) > 0 and \
      bool(np.all(np.asarray(value) == 0))


def relu_kind(node, static_value) -> str | None:
  """'relu' for max(x, 0), 'min6' for min(x, 6), 'relu6' for clamp(0, x, 6);
  None otherwise. ``static_value(i)`` returns operand i's constant or None."""
  if node.name == "max":
    for i in (0, 1):
      if is_zero(static_value(i)):
        return "relu"
  if node.name == "min":
    for i in (0, 1):
      v = static_value(i)
      if v is not None and np.size(v) > 0 and np.all(np.asarray(v) == 6):
        return "min6"
  if node.name == "clamp":
    lo, hi = static_value(0), static_value(2)
    if is_zero(lo) and hi is not None and np.all(np.asarray(hi) == 6):
      return "relu6"
  return None
