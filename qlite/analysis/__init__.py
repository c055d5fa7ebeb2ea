"""Analysis: compare float / fake-quant / LiteRT, end to end and per layer
(:mod:`.runner`, :mod:`.report`, :mod:`.matching`); find sensitive layers
(:mod:`.sensitivity`)."""
