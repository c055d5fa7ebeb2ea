"""Segment sums (graph networks): ``jax.ops.segment_sum(data, ids,
num_segments=N)`` with a static ``N`` traces as a one-hot matrix product,
``where(ids == arange(N), 1, 0)^T @ data``: SELECT_V2 and BATCH_MATMUL /
FULLY_CONNECTED, all int8. LiteRT's STABLEHLO_SCATTER (what jax's scatter-add
converts to) has no int8 kernel and the float one does not load.
Out-of-range ids are dropped, as jax's default mode does. Without a static
``num_segments`` jax's code runs (and strict export names the scatter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qlite.trace import intercept

HANDLERS = ()


def _segment_sum(original, data, segment_ids, num_segments=None,
                 indices_are_sorted=False, unique_indices=False,
                 bucket_size=None, mode=None, **kw):
  ok = (isinstance(num_segments, int) and bucket_size is None and not kw
        and mode in (None, "drop", jax.lax.GatherScatterMode.FILL_OR_DROP)
        and hasattr(data, "dtype") and jnp.issubdtype(data.dtype, jnp.floating)
        and hasattr(segment_ids, "dtype")
        and jnp.issubdtype(segment_ids.dtype, jnp.integer)
        and segment_ids.ndim == 1 and data.ndim >= 1
        and data.shape[0] == segment_ids.shape[0])
  if not ok:
    return original(data, segment_ids, num_segments, indices_are_sorted,
                    unique_indices, bucket_size, mode, **kw)
  hit = segment_ids[:, None] == jnp.arange(num_segments,
                                           dtype=segment_ids.dtype)[None, :]
  one_hot = jnp.where(hit, jnp.ones((), data.dtype), jnp.zeros((), data.dtype))
  flat = data.reshape(data.shape[0], -1)
  out = jax.lax.dot_general(one_hot, flat, (((0,), (0,)), ((), ())))
  return out.reshape((num_segments,) + data.shape[1:])


intercept.register(jax.ops.segment_sum, _segment_sum)
