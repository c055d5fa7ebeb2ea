"""One interceptor (qlite/trace/intercept.py): every way user code reaches a
wrapped function traces to the composite, and the model exports full-integer
with the native LiteRT op; two threads can trace at once."""

import functools
import threading
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import gelu as imported_gelu      # `from jax.nn import gelu`

import qlite
from qlite.trace import intercept

# Captured at import time, before qlite traces anything (as model libraries
# register their activations).
ACTIVATIONS = {"gelu_exact": functools.partial(nn.gelu, approximate=False),
               "softmax": functools.partial(jax.nn.softmax, axis=-1)}


class DictActivation(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = ACTIVATIONS["gelu_exact"](nn.Dense(16)(x))
    return ACTIVATIONS["softmax"](nn.Dense(8)(h))


class FieldActivation(nn.Module):
  activation: Callable = jax.nn.gelu         # a dataclass default

  @nn.compact
  def __call__(self, x):
    return nn.Dense(8)(self.activation(nn.Dense(16)(x)))


class ImportedActivation(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8)(imported_gelu(nn.Dense(16)(x)))


class LeakyAfterWarmup(nn.Module):
  slope: float = 0.2

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(16)(x)
    return nn.Dense(8)(jax.nn.leaky_relu(h, negative_slope=self.slope)
                       + jax.nn.leaky_relu(h))


RULES = [qlite.QuantizationRule(module_path=r".*", weight_qtype="int8",
                                act_qtype="int8")]


def _export(model, seed=0):
  rng = np.random.default_rng(seed)
  batches = [rng.normal(size=(4, 12)).astype(np.float32) for _ in range(4)]
  variables = model.init(jax.random.key(seed), batches[0])
  # warm up: call the model (and its activations) outside qlite first, so
  # jax's caches hold the plain traces
  model.apply(variables, batches[0])
  stats = qlite.calibrate(model, RULES, batches, variables=variables,
                          progress=False)
  blob = qlite.export_tflite(model, RULES, stats, batches[0][:1],
                             variables=variables)
  ref = np.asarray(model.apply(variables, batches[1]))
  out = np.concatenate([qlite.TFLiteRunner(blob).run(batches[1][i:i + 1])[0]
                        for i in range(4)])
  return qlite.inspect_tflite(blob), qlite.metrics.sqnr_db(ref, out)


@pytest.mark.parametrize("model, native", [
    (DictActivation(), {"GELU", "SOFTMAX"}),
    (FieldActivation(), {"GELU"}),
    (ImportedActivation(), {"GELU"}),
    (FieldActivation(activation=ACTIVATIONS["gelu_exact"]), {"GELU"}),
], ids=["partial_in_dict", "dataclass_default", "from_import",
        "partial_as_field"])
def test_alias_forms_trace_to_native_ops(model, native):
  info, sqnr = _export(model)
  assert info.full_integer
  assert native <= set(info.op_histogram), info.op_histogram
  assert sqnr > 25.0, sqnr


def test_jitted_leaky_relu_after_warmup_is_max_form():
  info, sqnr = _export(LeakyAfterWarmup())
  assert info.full_integer, info.op_histogram
  assert "MAXIMUM" in info.op_histogram
  assert sqnr > 25.0, sqnr


def test_interception_is_per_thread_and_restored():
  code = jax.nn.gelu.__code__
  seen = {}
  inside, release = threading.Event(), threading.Event()

  def other():
    inside.wait()
    seen["other"] = str(jax.make_jaxpr(lambda v: jax.nn.gelu(v))(jnp.ones(3)))
    release.set()

  t = threading.Thread(target=other)
  t.start()
  with intercept.active():
    seen["mine"] = str(jax.make_jaxpr(lambda v: jax.nn.gelu(v))(jnp.ones(3)))
    inside.set()
    release.wait(30)
  t.join()
  assert "aten.gelu.default" in seen["mine"]
  assert "composite" not in seen["other"]
  assert jax.nn.gelu.__code__ is code


def test_two_threads_export_at_once():
  results, errors = {}, []

  def run(name, model):
    try:
      results[name] = _export(model, seed=len(name))
    except Exception as e:  # reported below
      errors.append(e)

  threads = [threading.Thread(target=run, args=(n, m)) for n, m in
             [("dict", DictActivation()), ("field", FieldActivation())]]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  for info, sqnr in results.values():
    assert info.full_integer and "GELU" in info.op_histogram
    assert sqnr > 25.0


def test_vmapped_softmax_keeps_the_composite():
  f = jax.vmap(lambda v: jax.nn.softmax(v), in_axes=1, out_axes=1)
  x = np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32)
  with intercept.active():
    jaxpr = str(jax.make_jaxpr(f)(x))
    got = np.asarray(jax.jit(f)(x))
  assert "odml.softmax" in jaxpr
  np.testing.assert_allclose(got, np.asarray(jax.nn.softmax(x)), atol=1e-6)


def test_register_refuses_closures_and_builtins():
  def make():
    y = 1
    return lambda x: x + y
  with pytest.raises(TypeError, match="closure"):
    intercept.register(make(), lambda o, x: x)
  with pytest.raises(TypeError, match="cannot intercept"):
    intercept.register(len, lambda o, x: x)
