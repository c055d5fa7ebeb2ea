"""docs/architecture.md carries the op coverage table generated from the op
handlers: it must match what the handlers say now."""

import pathlib

from qlite.ops import coverage


def test_architecture_coverage_table_is_current():
  doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" /
         "architecture.md").read_text()
  assert coverage.table() in doc, (
      "docs/architecture.md's op coverage table is stale: regenerate it with "
      "`python -m qlite.ops.coverage`")
