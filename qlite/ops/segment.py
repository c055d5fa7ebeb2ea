"""Segment sums and maxima (graph networks).

``jax.ops.segment_sum(data, ids, num_segments=N)`` with a static ``N``
traces as a one-hot matrix product, ``where(ids == arange(N), 1, 0)^T @
data``: SELECT_V2 and BATCH_MATMUL / FULLY_CONNECTED, all int8. LiteRT's
STABLEHLO_SCATTER (what jax's scatter-add converts to) has no int8 kernel
and neither the float nor the int32 one loads. Integer data (node degree
counts: ``segment_sum(ones_like(senders), senders, N)``) sums a masked
``[rows, N]`` int32 tensor (SELECT_V2, SUM).

``jax.ops.segment_max`` (jraph's ``segment_softmax``, GAT attention) traces
as a masked maximum: ``max over rows of where(hit, data, column minimum)``
with ``hit = ids == arange(N)`` -- SELECT_V2 of two values at the data's
scale and REDUCE_MAX, all int8 (an ``[rows, N, features]`` intermediate).
A segment no id points at gets the data's column minimum where jax gives
-inf (int8 cannot hold it; segment softmax never reads it).

Out-of-range ids are dropped, as jax's default mode does. Without a static
``num_segments`` jax's code runs (and strict export names the scatter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qlite.trace import intercept

HANDLERS = ()


def _static_form(data, segment_ids, num_segments, bucket_size, mode,
                 kw, dtypes=(jnp.floating,)) -> bool:
  """Whether a segment op has the form qlite rewrites: float data (or one
  of ``dtypes``), 1-D int ids over its rows, a static ``num_segments``,
  jax's default mode."""
  return (isinstance(num_segments, int) and bucket_size is None and not kw
          and mode in (None, "drop", jax.lax.GatherScatterMode.FILL_OR_DROP)
          and hasattr(data, "dtype")
          and any(jnp.issubdtype(data.dtype, d) for d in dtypes)
          and hasattr(segment_ids, "dtype")
          and jnp.issubdtype(segment_ids.dtype, jnp.integer)
          and segment_ids.ndim == 1 and data.ndim >= 1
          and data.shape[0] == segment_ids.shape[0])


def _hits(segment_ids, num_segments):
  """``[rows, num_segments]`` bool: row r belongs to segment s."""
  return segment_ids[:, None] == jnp.arange(num_segments,
                                            dtype=segment_ids.dtype)[None, :]


def _segment_sum(original, data, segment_ids, num_segments=None,
                 indices_are_sorted=False, unique_indices=False,
                 bucket_size=None, mode=None, **kw):
  if not _static_form(data, segment_ids, num_segments, bucket_size, mode, kw,
                      (jnp.floating, jnp.integer)):
    return original(data, segment_ids, num_segments, indices_are_sorted,
                    unique_indices, bucket_size, mode, **kw)
  hit = _hits(segment_ids, num_segments)
  if jnp.issubdtype(data.dtype, jnp.integer):      # counts (node degrees)
    flat = data.reshape(data.shape[0], -1)
    masked = jnp.where(hit[:, :, None], flat[:, None, :],
                       jnp.zeros((), data.dtype))
    return jnp.sum(masked, axis=0).reshape((num_segments,) + data.shape[1:])
  one_hot = jnp.where(hit, jnp.ones((), data.dtype), jnp.zeros((), data.dtype))
  flat = data.reshape(data.shape[0], -1)
  out = jax.lax.dot_general(one_hot, flat, (((0,), (0,)), ((), ())))
  return out.reshape((num_segments,) + data.shape[1:])


def _segment_max(original, data, segment_ids, num_segments=None,
                 indices_are_sorted=False, unique_indices=False,
                 bucket_size=None, mode=None, **kw):
  if not _static_form(data, segment_ids, num_segments, bucket_size, mode, kw):
    return original(data, segment_ids, num_segments, indices_are_sorted,
                    unique_indices, bucket_size, mode, **kw)
  hit = _hits(segment_ids, num_segments)
  flat = data.reshape(data.shape[0], -1)                    # [rows, F]
  lowest = jnp.min(flat, axis=0, keepdims=True)             # [1, F]
  masked = jnp.where(hit[:, :, None], flat[:, None, :], lowest[:, None, :])
  out = jnp.max(masked, axis=0)                             # [N, F]
  return out.reshape((num_segments,) + data.shape[1:])


intercept.register(jax.ops.segment_sum, _segment_sum)
intercept.register(jax.ops.segment_max, _segment_max)
