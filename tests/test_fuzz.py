"""CI slice of the model fuzzer (25 seeds; `make fuzz` runs 200)."""

import pytest

import fuzz_models


@pytest.mark.parametrize("seed", range(25))
def test_fuzz_seed(seed):
  r = fuzz_models.run_seed(seed)
  assert r.outcome in ("full_integer", "named_error"), r.detail
  if r.outcome == "named_error":   # a named error must say what to change
    assert "`" in r.detail or "rule" in r.detail, r.detail
