"""Backend-neutral quantization layer: the Provider base, the boundary plan
and boundary scales."""
