"""LiteRT op handlers: what each op means for a full-integer LiteRT model."""
