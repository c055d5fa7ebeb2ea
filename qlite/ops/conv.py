"""Convolutions: ``conv_general_dilated`` -> CONV_2D / DEPTHWISE_CONV_2D.

The constant operand is a weight, quantized per output channel (symmetric,
narrow range). A following bias, BatchNorm's per-channel affine ops and a
relu / relu6 fuse into the kernel. A 1-D convolution is reshaped to 2-D by
the converter between the conv and what follows, so nothing fuses into it.
A conv with one input channel becomes DEPTHWISE_CONV_2D.

Transposed convolutions (``lax.conv_transpose``, ``nn.ConvTranspose``,
``nnx.ConvTranspose``, any conv with ``lhs_dilation``) are traced as a
*sub-pixel* convolution: one stride-1 CONV_2D over the undilated input with
``s_h * s_w * O`` output channels (one block of ``O`` per output phase),
then depth-to-space (RESHAPE / TRANSPOSE) and a SLICE to the output size.
The sub-pixel kernel is the original one regrouped by phase (zero where a
phase has no tap), computed from the weight in the traced graph, so it is a
constant at conversion and is quantized per output channel (per phase and
channel). Same float numbers as the dilated conv (the same products, summed
in another order); s_h * s_w fewer multiplications by zero.

Why: for a conv with ``lhs_dilation`` litert-converter 0.5.0
(``ConvertNonTrivialConvToTransposeConvOp``) emits TRANSPOSE_CONV behind a
REVERSE_V2 of the dequantized kernel, so the kernel, the input and the op
stay float whatever the weight's quantization (per channel on any axis, per
tensor, kernel flipped beforehand, ``rev(fq(rev(w)))``: REVERSE_V2 is not
folded into the quantized constant, the TRANSPOSE the converter adds is);
TRANSPOSE_CONV also fails to prepare for odd kernels with SAME padding
("computed_input_height 7 != 8") and explicit paddings do not legalize.

For Flax's ConvTranspose modules the bias is added to the sub-pixel conv's
output (tiled per phase), right after the conv, so it fuses into CONV_2D; a
1-D transposed conv runs as a 2-D one (H = 1) so that the bias fuses too.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from jax import lax

from qlite.ops import base
from qlite.trace import intercept


class Conv(base.OpHandler):
  family = "conv"
  primitives = frozenset({"conv_general_dilated"})
  litert_ops = ("CONV_2D", "DEPTHWISE_CONV_2D")
  # per-channel affine ops after a conv (BatchNorm) fold into it
  fuses_per_channel_affine = True
  notes = ("a transposed conv (lhs_dilation) is traced as a sub-pixel conv + "
           "depth-to-space")

  def role(self, node) -> str:
    return base.WEIGHTED

  def weight_axis(self, node, operand: int, ndim: int) -> int | None:
    if operand != 1:
      return None
    return int(node.params["dimension_numbers"].rhs_spec[0])

  def accepts_fusion(self, node) -> bool:
    return len(node.params["dimension_numbers"].lhs_spec) != 3   # not 1-D


HANDLERS = (Conv(),)


# -- transposed convolution as a sub-pixel convolution

def _phases(n: int, s: int, k: int, d: int, pad: tuple[int, int]):
  """One spatial dim of ``conv(dilate(x, s), w, padding=pad,
  rhs_dilation=d)`` (stride 1): ``y[s*q + r] = sum_k x[q + m] w[k]`` over
  the taps ``k`` of phase ``r`` (``m = (r - pad_lo + k*d) / s``, exact).

  Returns ``(out_len, q_len, first, t_len, taps)``: ``y`` has ``out_len``
  values; the sub-pixel conv computes ``q_len`` positions per phase, reading
  ``x[q + first + t]`` for ``t < t_len``; ``taps[t, r]`` is the kernel index
  at window offset ``t`` of phase ``r``, or ``k`` (the zero row) for none.
  """
  lo, hi = pad
  out_len = (n - 1) * s + 1 + lo + hi - (k - 1) * d
  q_len = -(-out_len // s)
  offsets = {}
  for r in range(s):
    for j in range(k):
      if (r - lo + j * d) % s == 0:
        offsets[(r, j)] = (r - lo + j * d) // s
  first, last = min(offsets.values()), max(offsets.values())
  t_len = last - first + 1
  taps = np.full((t_len, s), k, np.int32)
  for (r, j), m in offsets.items():
    taps[m - first, r] = j
  return out_len, q_len, first, t_len, taps


def subpixel_conv_transpose(x, kernel, strides, padding, rhs_dilation=None,
                            bias=None, precision=None):
  """``lax.conv_general_dilated(x, kernel, (1,)*n, padding,
  lhs_dilation=strides, rhs_dilation=rhs_dilation)`` (+ ``bias``) for
  channels-last ``x`` (N, *spatial, C) and ``kernel`` (*spatial, I, O),
  1 or 2 spatial dims, explicit ``padding`` pairs, computed as a stride-1
  conv with ``prod(strides) * O`` output channels followed by
  depth-to-space and a slice (see the module docstring). Returns None
  when no output value reads the input (degenerate paddings)."""
  nsp = x.ndim - 2
  if rhs_dilation is None:
    rhs_dilation = (1,) * nsp
  if nsp == 1:        # as 2-D with H = 1: CONV_2D then takes the bias
    x, kernel = x[:, None], kernel[None]
    strides, padding = (1,) + tuple(strides), ((0, 0),) + tuple(padding)
    rhs_dilation = (1,) + tuple(rhs_dilation)
  n_b, c_in, c_out = x.shape[0], kernel.shape[2], kernel.shape[3]
  dims = [_phases(x.shape[1 + i], strides[i], kernel.shape[i],
                  rhs_dilation[i], tuple(padding[i])) for i in range(2)]
  # input window: x[first .. q_len - 1 + first + t_len - 1], zero outside
  starts, stops, pads = [], [], []
  for i, (out_len, q_len, first, t_len, _) in enumerate(dims):
    n = x.shape[1 + i]
    last = q_len - 1 + first + t_len - 1
    start = min(max(first, 0), n)
    stop = min(max(last + 1, start), n)
    lo, hi = start - first, last + 1 - stop
    if out_len <= 0 or lo < 0 or hi < 0:
      return None         # the output lies in the padding: not worth it
    starts.append(start)
    stops.append(stop)
    pads.append((lo, hi))
  if starts != [0, 0] or stops != list(x.shape[1:3]):
    x = x[:, starts[0]:stops[0], starts[1]:stops[1]]
  # sub-pixel kernel (Th, Tw, I, sh * sw * O): phase blocks of O channels
  kz = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))   # zero tap
  th, tw = dims[0][4], dims[1][4]
  idx_h = th[:, None, :, None]      # (Th, 1, sh, 1)
  idx_w = tw[None, :, None, :]      # (1, Tw, 1, sw)
  sub = kz[idx_h, idx_w]            # (Th, Tw, sh, sw, I, O)
  sh, sw = strides
  sub = jnp.transpose(sub, (0, 1, 4, 2, 3, 5)).reshape(
      th.shape[0], tw.shape[0], c_in, sh * sw * c_out)
  z = lax.conv_general_dilated(x, sub, (1, 1), pads,
                               dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               precision=precision)
  if bias is not None:
    z = z + jnp.tile(jnp.reshape(bias, (-1,)), sh * sw)
  qh, qw = z.shape[1], z.shape[2]
  if sh == 1:
    y = z.reshape(n_b, qh, qw * sw, c_out)
  else:
    y = z.reshape(n_b, qh, qw, sh, sw, c_out)
    y = jnp.transpose(y, (0, 1, 3, 2, 4, 5)).reshape(n_b, qh * sh, qw * sw,
                                                    c_out)
  out_h, out_w = dims[0][0], dims[1][0]
  if (out_h, out_w) != y.shape[1:3]:
    y = y[:, :out_h, :out_w]
  return y[:, 0] if nsp == 1 else y


def _f32(*arrays) -> bool:
  return all(getattr(a, "dtype", None) == jnp.float32 for a in arrays)


def _conv_general_dilated(original, lhs, rhs, window_strides, padding,
                          lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1,
                          batch_group_count=1, precision=None,
                          preferred_element_type=None, **kw):
  """A conv with ``lhs_dilation`` (1-D / 2-D, float32, no groups, window
  stride 1) runs as :func:`subpixel_conv_transpose`; anything else runs
  jax's own code."""
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
          dimension_numbers, feature_group_count, batch_group_count,
          precision, preferred_element_type)
  if (lhs_dilation is None or all(int(s) == 1 for s in lhs_dilation)
      or kw or isinstance(padding, str) or not _f32(lhs, rhs)
      or getattr(lhs, "ndim", 0) not in (3, 4)
      or any(int(s) != 1 for s in window_strides)
      or feature_group_count != 1 or batch_group_count != 1
      or preferred_element_type not in (None, jnp.float32)):
    return original(*args, **kw)
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  nsp = lhs.ndim - 2
  x_perm = (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])
  w_perm = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])
  x = lhs if x_perm == tuple(range(lhs.ndim)) else jnp.transpose(lhs, x_perm)
  w = rhs if w_perm == tuple(range(rhs.ndim)) else jnp.transpose(rhs, w_perm)
  y = subpixel_conv_transpose(x, w, tuple(int(s) for s in lhs_dilation),
                              [tuple(p) for p in padding], rhs_dilation,
                              precision=precision)
  if y is None:
    return original(*args, **kw)
  # y is (N, *spatial, C): put each logical dim where out_spec says
  logical = (0, *range(2, nsp + 2), 1)       # y axis j holds logical dim
  perm = [0] * y.ndim
  for j, dim in enumerate(logical):
    perm[dn.out_spec[dim]] = j
  return y if perm == list(range(y.ndim)) else jnp.transpose(y, perm)


def _transpose_padding(k: int, s: int, padding):
  """Padding of ``lax.conv_transpose``'s dilated conv for one dim (jax's
  ``_conv_transpose_padding``, ``use_consistent_padding=False``)."""
  if padding == "SAME":
    pad_len = k + s - 2
    pad_a = k - 1 if s > k - 1 else int(math.ceil(pad_len / 2))
    return pad_a, pad_len - pad_a
  pad_len = k + s - 2 + max(k - s, 0)       # VALID
  return k - 1, pad_len - (k - 1)


def _conv_transpose(x, kernel, bias, kernel_size, strides, padding,
                    kernel_dilation, transpose_kernel: bool, precision):
  """Flax ConvTranspose's computation (after its parameters are read) with
  the bias fused into the sub-pixel conv; ``x`` has one batch dim."""
  nsp = len(kernel_size)
  def broadcast(v):
    v = 1 if v is None else v
    return (v,) * nsp if isinstance(v, int) else tuple(v)
  strides, dilation = broadcast(strides), broadcast(kernel_dilation)
  if isinstance(padding, str):
    pads = [_transpose_padding((k - 1) * d + 1, s, padding)
            for k, s, d in zip(kernel_size, strides, dilation)]
  else:
    pads = [tuple(p) for p in padding]
  if transpose_kernel:
    kernel = jnp.flip(kernel, tuple(range(nsp))).swapaxes(-1, -2)
  y = subpixel_conv_transpose(x, kernel, strides, pads, dilation,
                              bias=bias, precision=precision)
  if y is None:         # degenerate padding: the dilated conv, as jax has it
    y = lax.conv_transpose(x, kernel, strides, pads, rhs_dilation=dilation,
                           precision=precision)
    if bias is not None:
      y = y + bias
  return y


def _module_padding(padding, nsp: int):
  """Flax's canonical padding when the fast path handles it, else None."""
  if isinstance(padding, str):
    return padding if padding in ("SAME", "VALID") else None
  if isinstance(padding, int):
    return [(padding, padding)] * nsp
  try:
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  except TypeError:
    return None
  return pads if len(pads) == nsp and all(len(p) == 2 for p in pads) \
      else None


def _fast_path(x, kernel_size, padding, dtype, param_dtype,
               preferred_element_type) -> bool:
  nsp = len(kernel_size)
  return (nsp in (1, 2) and getattr(x, "ndim", 0) == nsp + 2
          and _f32(x) and (dtype is None or jnp.dtype(dtype) == jnp.float32)
          and jnp.dtype(param_dtype) == jnp.float32
          and preferred_element_type is None
          and _module_padding(padding, nsp) is not None)


def _linen_call(original, self, inputs):
  ks = (self.kernel_size,) if isinstance(self.kernel_size, int) \
      else tuple(self.kernel_size)
  if type(self) is not nn.ConvTranspose or not _fast_path(
      inputs, ks, self.padding, self.dtype, self.param_dtype,
      self.preferred_element_type):
    return original(self, inputs)
  in_features = inputs.shape[-1]
  kernel_shape = ks + ((self.features, in_features) if self.transpose_kernel
                       else (in_features, self.features))
  if self.mask is not None and self.mask.shape != kernel_shape:
    return original(self, inputs)      # flax raises its own error
  kernel = self.param("kernel", self.kernel_init, kernel_shape,
                      self.param_dtype)
  if self.mask is not None:
    kernel = kernel * self.mask
  bias = self.param("bias", self.bias_init, (self.features,),
                    self.param_dtype) if self.use_bias else None
  return _conv_transpose(inputs, kernel, bias, ks, self.strides,
                         _module_padding(self.padding, len(ks)),
                         self.kernel_dilation, self.transpose_kernel,
                         self.precision)


def _nnx_call(original, self, inputs):
  ks = tuple(self.kernel_size)
  if type(self) is not nnx.ConvTranspose or not _fast_path(
      inputs, ks, self.padding, self.dtype, self.param_dtype,
      self.preferred_element_type):
    return original(self, inputs)
  kernel = self.kernel[...]
  if self.mask is not None:
    if self.mask.shape != kernel.shape:
      return original(self, inputs)    # flax raises its own error
    kernel = kernel * self.mask
  bias = self.bias[...] if self.bias is not None else None
  if not _f32(kernel) or (bias is not None and not _f32(bias)):
    return original(self, inputs)
  return _conv_transpose(inputs, kernel, bias, ks, self.strides,
                         _module_padding(self.padding, len(ks)),
                         self.kernel_dilation, self.transpose_kernel,
                         self.precision)


intercept.register(lax.conv_general_dilated, _conv_general_dilated)
# Linen wraps __call__ (scope handling); its __wrapped__ is flax's own code.
intercept.register(nn.ConvTranspose.__call__.__wrapped__, _linen_call)
intercept.register(nnx.ConvTranspose.__call__, _nnx_call)
