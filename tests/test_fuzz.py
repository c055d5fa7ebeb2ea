"""CI slice of the model fuzzer (25 seeds; `make fuzz` runs 200).

The generator draws only from qlite's supported vocabulary (image, sequence,
int32-token and segment-sum graph models), so every seed must export
full-integer; a named error passes only for a seed listed, with its error
class and reason, in ``fuzz_models.EXPECTED_NAMED_ERRORS`` (none in 0-24).
About 80 s on a shared 2-core machine (RNN seeds take 5-15 s each)."""

import pytest

import fuzz_models
import qlite


@pytest.mark.parametrize("seed", range(25))
def test_fuzz_seed(seed):
  r = fuzz_models.run_seed(seed)
  problem = fuzz_models.unexpected(r)
  assert problem is None, f"seed {seed}: {problem}"
  if seed not in fuzz_models.EXPECTED_NAMED_ERRORS:
    assert r.outcome == "full_integer"      # (what unexpected() checked)


def test_expected_named_errors_are_well_formed():
  for seed, (cls, why) in fuzz_models.EXPECTED_NAMED_ERRORS.items():
    assert isinstance(seed, int) and seed >= 0, seed
    assert issubclass(getattr(qlite, cls), qlite.QliteError), cls
    assert why.strip(), (seed, cls)
