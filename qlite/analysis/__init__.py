"""Analysis: compare float / fake-quant / LiteRT, end to end and per layer;
find sensitive layers."""
