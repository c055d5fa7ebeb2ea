"""Benchmark cases: the zoo models (Linen) with 32 calibration batches drawn
from the zoo's own data generators, a held-out evaluation set and the float
JAX reference outputs on it. ``bench/odml.py`` builds each case once and
pickles it, so every export subprocess sees identical weights and data."""

from __future__ import annotations

import dataclasses
import pickle

import jax
import numpy as np

from qlite.zoo import base

CALIB_BATCHES = 32
EVAL_SAMPLES = 64          # non-digits models: held-out rows, run at batch 1

# family -> (zoo module name, Linen class name, batch generator, data seed)
_SYNTHETIC = {
    "mobilenet_v2": ("mobilenet_v2", "MobileNetV2", "uniform", 100),
    "resnet": ("resnet", "ResNet", "uniform", 200),
    "transformer": ("transformer", "Transformer", "normal", 300),
    "unet": ("unet", "UNet", "uniform", 400),
}


@dataclasses.dataclass
class Case:
  """One model to benchmark (everything as numpy; picklable)."""
  name: str                 # row label, e.g. "mobilenet_v2" or "transformer_x4"
  family: str               # zoo family, or "wide_transformer"
  width: int
  variables: dict
  calib: list               # CALIB_BATCHES float32 batches
  example_args: tuple       # batch-1 example
  eval_x: np.ndarray        # evaluation inputs (rows)
  eval_y: np.ndarray | None  # labels (digits) or None
  ref: np.ndarray           # float JAX outputs on eval_x

  def param_bytes(self) -> int:
    return int(sum(np.asarray(x).nbytes
                   for x in jax.tree_util.tree_leaves(self.variables)))

  def save(self, path: str) -> None:
    with open(path, "wb") as f:
      pickle.dump(self, f)

  @staticmethod
  def load(path: str) -> "Case":
    with open(path, "rb") as f:
      return pickle.load(f)


def flax_model(case: Case):
  """The Linen module of ``case`` (built from its name: cheap, no weights)."""
  if case.family == "digits_cnn":
    from qlite.zoo import digits
    return digits.DigitsCNN()
  if case.family == "wide_transformer":
    from qlite.zoo.transformer import Transformer
    return Transformer(width=case.width)
  import importlib
  mod_name, cls, _, _ = _SYNTHETIC[case.family]
  return getattr(importlib.import_module(f"qlite.zoo.{mod_name}"), cls)()


def _np_tree(tree):
  return jax.tree_util.tree_map(lambda x: np.array(x, np.float32), tree)


def _float_outputs(model, variables, x: np.ndarray) -> np.ndarray:
  fn = jax.jit(lambda v, xi: model.apply(v, xi))
  return np.concatenate([np.asarray(fn(variables, x[i:i + 1]))
                         for i in range(len(x))])


def build(name: str) -> Case:
  """Builds the case named ``name``: a zoo family (``digits_cnn``,
  ``mobilenet_v2``, ``resnet``, ``transformer``, ``unet``) or
  ``transformer_x{W}`` (the transformer at W times its width)."""
  if name == "digits_cnn":
    from qlite.zoo import digits_cnn, digits, registry
    zm = registry.get("digits_cnn/linen")
    data = digits.load_digits(seed=0)
    calib = data.batches(digits_cnn.BATCH_SIZE, CALIB_BATCHES, split="train")
    variables = _np_tree(zm.variables)
    x, y = data.x_test, data.y_test
    case = Case(name, "digits_cnn", 1, variables, calib,
                (np.ascontiguousarray(x[:1]),), x, y, None)
  elif name.startswith("transformer_x"):
    from qlite.zoo import transformer
    from qlite.zoo.transformer import Transformer
    width = int(name.split("_x")[1])
    shape = (transformer.SEQ_LEN, transformer.IN_FEATURES)
    calib = base.normal_batches(shape, seed=300, num=CALIB_BATCHES)
    model = Transformer(width=width)
    variables = _np_tree(base.init_linen(model, 0, calib[0][:1]))
    x = base.normal_batches(shape, seed=9300, num=1,
                            batch_size=EVAL_SAMPLES)[0]
    case = Case(name, "wide_transformer", width, variables, calib,
                base.example_from(calib), x, None, None)
  else:
    import importlib
    from qlite.zoo import registry
    mod_name, _, gen, seed = _SYNTHETIC[name]
    mod = importlib.import_module(f"qlite.zoo.{mod_name}")
    zm = registry.get(f"{name}/linen")
    shape = (getattr(mod, "INPUT_SHAPE", None) or
             (mod.SEQ_LEN, mod.IN_FEATURES))
    make = base.uniform_batches if gen == "uniform" else base.normal_batches
    calib = make(shape, seed=seed, num=CALIB_BATCHES)   # first 8 = the zoo's
    assert np.array_equal(calib[0], zm.batches[0])
    x = make(shape, seed=seed + 9000, num=1, batch_size=EVAL_SAMPLES)[0]
    case = Case(name, name, 1, _np_tree(zm.variables), calib,
                base.example_from(calib), x, None, None)
  case.ref = _float_outputs(flax_model(case), case.variables, case.eval_x)
  return case
