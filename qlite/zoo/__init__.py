"""Built-in example models (used by ``qlite demo``, tests and benchmarks)."""
