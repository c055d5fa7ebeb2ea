import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))   # tests/fuzz_models.py

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def digits_data():
  from qlite.zoo import digits
  return digits.load_digits(seed=0)


@pytest.fixture(scope="session")
def digits_trained(digits_data):
  """(model, variables) of the Linen DigitsCNN trained for 300 steps."""
  from qlite.zoo import digits
  return digits.train(digits_data, steps=300, seed=0)


@pytest.fixture(scope="session")
def int8_rules():
  import qlite
  return [qlite.QuantizationRule(module_path=r".*", weight_qtype="int8",
                                 act_qtype="int8", act_static_scale=True)]


@pytest.fixture(scope="session")
def digits_export(digits_data, digits_trained, int8_rules):
  """(stats, blob) of the trained digits CNN: 32 calibration batches."""
  import qlite
  model, variables = digits_trained
  stats = qlite.calibrate(model, int8_rules, digits_data.batches(32, 32),
                          variables=variables, progress=False)
  blob = qlite.export_tflite(model, int8_rules, stats, digits_data.x_test[:1],
                             variables=variables)
  return stats, blob


_TINY_ENTRY = '''
import jax
import numpy as np
from flax import linen as nn

class Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(4)(x)

def make():
  model = Tiny()
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(8, 6)).astype(np.float32)
             for _ in range(3)]
  variables = model.init(jax.random.key(0), batches[0])
  return model, variables, batches
'''


@pytest.fixture
def tiny_cli_entry(tmp_path, monkeypatch):
  """Writes a user module ``NAME.py`` whose ``make()`` returns a tiny Linen
  MLP ``(model, variables, batches)`` into ``tmp_path`` (put on sys.path and
  made the working directory); call it with NAME, use ``f"{NAME}:make"``."""
  def write(name: str) -> str:
    (tmp_path / f"{name}.py").write_text(_TINY_ENTRY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return name
  return write
