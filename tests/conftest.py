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
