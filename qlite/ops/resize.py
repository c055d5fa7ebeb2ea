"""RESIZE_BILINEAR / RESIZE_NEAREST_NEIGHBOR.

2x bilinear ``jax.image.resize`` of NHWC float images (any alias) traces as
an ``odml.upsample_bilinear2d`` composite, which the converter lowers to one
RESIZE_BILINEAR (half-pixel centers: jax's numbers, both clamp at the edges).
Its decomposition (:func:`bilinear_2x`) computes the same numbers as jax's
resize. The converter reads the output size from the ``size`` attribute
(i64[2]; without it litert-converter 0.5.0 crashes); ``is_nchw_op`` is left
out (NHWC is the default). RESIZE_BILINEAR's int8 kernel reads its input at
the output's scale: they share one range. Under ``vmap`` the batch axis is
folded into N. Nearest resizes lower to RESIZE_NEAREST_NEIGHBOR by
themselves (pass-through gathers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qlite.ops import base
from qlite.trace import intercept

NAME = "odml.upsample_bilinear2d"


class ResizeBilinear(base.OpHandler):
  family = "resize"
  primitives = frozenset({NAME})
  litert_ops = ("RESIZE_BILINEAR",)

  def same_scale_output(self, node, ctx, scaled_by):
    return [node.outputs[0]]


def bilinear_2x(image):
  """jax's half-pixel bilinear 2x upsampling of an NHWC image, written as
  nearest 2x + edge pad + a fixed depthwise [1,2,1]x[1,2,1]/16 kernel
  (identical numbers: each output is 3/4 of its nearest input plus 1/4 of
  the next one towards it, per axis, clamped at the edges)."""
  n, h, w, c = image.shape
  up = _original(image, (n, 2 * h, 2 * w, c), "nearest")
  up = jnp.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  # The kernel is computed from an iota, not held as an array constant: a
  # composite passes its decomposition's array constants as extra leading
  # operands, and the converter's RESIZE_BILINEAR pattern matches only a
  # composite with the image as its one operand.
  k1 = 0.5 - 0.25 * jnp.abs(jax.lax.iota(image.dtype, 3) - 1.0)  # 1,2,1 / 4
  kernel = jnp.broadcast_to((k1[:, None] * k1[None, :])[:, :, None, None],
                            (3, 3, 1, c))
  return jax.lax.conv_general_dilated(
      up, kernel, (1, 1), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def _composite(image):
  h, w = image.shape[1:3]
  return jax.lax.composite(lambda v, **_: bilinear_2x(v), name=NAME)(
      image, size=np.array([2 * h, 2 * w], np.int64), align_corners=False)


@jax.custom_batching.custom_vmap
def _upsample(image):
  return _composite(image)


@_upsample.def_vmap
def _upsample_vmap(axis_size, in_batched, x):
  if not in_batched[0]:
    return _upsample(x), False
  y = _upsample(x.reshape((-1,) + x.shape[2:]))      # fold the batch into N
  return y.reshape(x.shape[:2] + y.shape[1:]), True


def _resize(original, image, shape, method, antialias=True, precision=None,
            **kw):
  args = dict(antialias=antialias, **kw)
  if precision is not None:
    args["precision"] = precision
  name = getattr(method, "name", str(method)).lower()
  shape = tuple(int(d) for d in shape)
  ok = (name in ("bilinear", "linear") and getattr(image, "ndim", 0) == 4
        and jnp.issubdtype(image.dtype, jnp.floating)
        and shape[0] == image.shape[0] and shape[3] == image.shape[3]
        and shape[1] == 2 * image.shape[1] and shape[2] == 2 * image.shape[2])
  if not ok:
    return original(image, shape, method, **args)
  return _upsample(image)


_original = intercept.register(jax.image.resize, _resize)

HANDLERS = (ResizeBilinear(),)
