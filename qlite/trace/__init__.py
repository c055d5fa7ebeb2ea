"""Tracing layer: a Flax model (Linen / NNX) as a flat graph of jax primitives,
each op carrying its Flax module path and source line."""
