"""The model zoo: every registry entry builds, runs, is deterministic and
small, and the Linen / NNX variants of a family share one architecture."""

import collections
import functools

import jax
from jax.extend import core as jex_core
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import qlite
from qlite.zoo import digits_cnn, registry

NAMES = list(registry.ZOO)
MAX_PARAMS = 1_000_000


@functools.lru_cache(maxsize=None)
def built(name):
  """Each zoo model built once per test session."""
  return registry.get(name)


@functools.lru_cache(maxsize=None)
def _jitted(name):
  """A jitted ``f(weights, *args)`` for the architecture of ``name``."""
  z = built(name)
  if z.framework == "linen":
    return jax.jit(z.model.apply)
  graphdef = nnx.graphdef(z.model)
  return jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))


def weights(z):
  """The Linen variables or the NNX state of zoo model ``z``."""
  return z.variables if z.framework == "linen" else nnx.state(z.model)


def forward(name, z=None):
  """Jitted float forward of ``z`` (default: the cached ``name`` model)."""
  z = built(name) if z is None else z
  return functools.partial(_jitted(name), weights(z))


def _args(batch):
  """A calibration batch as a tuple of positional arrays."""
  return batch if isinstance(batch, tuple) else (batch,)


def _primitives(jaxpr, out=None):
  """Counter of primitive names in ``jaxpr``, sub-jaxprs inlined."""
  out = collections.Counter() if out is None else out
  for eqn in jaxpr.eqns:
    subs = [v for v in eqn.params.values()
            if isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr))]
    if subs:
      for sub in subs:
        _primitives(getattr(sub, "jaxpr", sub), out)
    else:
      out[eqn.primitive.name] += 1
  return out


@functools.lru_cache(maxsize=None)
def primitives(name):
  """Counter of the primitives of the cached model ``name`` on its example."""
  z = built(name)
  if z.framework == "linen":
    fn = functools.partial(z.model.apply, z.variables)
    return _primitives(jax.make_jaxpr(fn)(*z.example_args).jaxpr)
  # the state as a traced argument (nnx.scan inside nnx.RNN needs it)
  graphdef, state = nnx.split(z.model)
  fn = lambda st, *args: nnx.merge(graphdef, st)(*args)
  return _primitives(jax.make_jaxpr(fn)(state, *z.example_args).jaxpr)


def test_registry_has_linen_and_nnx_of_every_family():
  families = {n.split("/")[0] for n in NAMES}
  assert families == set(registry.FAMILIES)
  assert families >= {"digits_cnn", "mobilenet_v2", "resnet", "transformer",
                      "unet", "tcn", "squeeze_excite", "mlp_mixer",
                      "causal_lm", "rnn_classifier", "autoencoder",
                      "graph_net", "diffusion_unet", "moe"}
  assert sorted(NAMES) == sorted(f"{f}/{k}" for f in families
                                 for k in ("linen", "nnx"))


def test_get_unknown_name_lists_valid_names():
  with pytest.raises(qlite.QliteError) as e:
    registry.get("no_such_model/linen")
  for name in NAMES:
    assert name in str(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_model_runs_on_example_and_batches(name):
  z = built(name)
  assert z.name == name
  assert z.framework == name.split("/")[1]
  assert (z.variables is None) == (z.framework == "nnx")
  assert isinstance(z.model, nnx.Module if z.framework == "nnx"
                    else nn.Module)
  assert z.param_count() < MAX_PARAMS
  assert len(z.batches) >= 8
  for a in z.example_args:       # float inputs, or int32 token ids / indices
    assert isinstance(a, np.ndarray) and a.dtype in (np.float32, np.int32)
    assert a.shape[0] == 1
  fwd = forward(name)
  out = np.asarray(fwd(*z.example_args))
  assert out.shape[0] == 1 and np.all(np.isfinite(out))
  for batch in z.batches:
    args = _args(batch)
    assert 1 <= args[0].shape[0] <= 8
    assert args[0].shape[1:] == z.example_args[0].shape[1:]
    out = np.asarray(fwd(*args))
    assert out.shape[0] == args[0].shape[0]
    assert np.all(np.isfinite(out)), name
    assert np.std(out) > 0, name     # not degenerate


@pytest.mark.parametrize("name", NAMES)
def test_building_twice_is_deterministic(name):
  if name == "digits_cnn/linen":
    digits_cnn.clear_cache()         # really retrain
  z1, z2 = built(name), registry.get(name)
  for b1, b2 in zip(z1.batches, z2.batches, strict=True):
    for a1, a2 in zip(_args(b1), _args(b2), strict=True):
      np.testing.assert_array_equal(a1, a2)
  w1, w2 = jax.tree_util.tree_leaves(weights(z1)), jax.tree_util.tree_leaves(
      weights(z2))
  assert len(w1) == len(w2)
  for a, b in zip(w1, w2):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for batch in z1.batches[:2]:
    np.testing.assert_array_equal(
        np.asarray(forward(name)(*_args(batch))),
        np.asarray(forward(name, z2)(*_args(batch))))


COMPUTE = {"conv_general_dilated", "dot_general", "reduce_window_max",
           "reduce_window_sum", "reduce_max", "reduce_sum", "concatenate",
           "max", "min", "exp", "erfc", "tanh", "logistic",
           "rsqrt"}


@pytest.mark.parametrize("family", sorted({n.split("/")[0] for n in NAMES}))
def test_linen_and_nnx_share_architecture(family):
  """Same parameter count and the same counts of compute primitives in both
  (bias broadcasting, reshapes and the attention's transposes differ between
  Linen and NNX, so those are not compared)."""
  lin, nx = built(f"{family}/linen"), built(f"{family}/nnx")
  assert lin.param_count() == nx.param_count()
  pick = lambda c: {k: v for k, v in c.items() if k in COMPUTE}
  assert pick(primitives(f"{family}/linen")) == pick(
      primitives(f"{family}/nnx"))


def test_digits_nnx_shares_trained_weights():
  lin, nx = built("digits_cnn/linen"), built("digits_cnn/nnx")
  x = lin.batches[0]
  np.testing.assert_allclose(np.asarray(forward("digits_cnn/linen")(x)),
                             np.asarray(forward("digits_cnn/nnx")(x)),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v2/linen", "mobilenet_v2/nnx",
                                  "resnet/linen", "resnet/nnx"])
def test_batchnorm_statistics_are_non_trivial(name):
  z = built(name)
  if z.framework == "linen":
    stats = z.variables["batch_stats"]
    means = [v for p, v in jax.tree_util.tree_leaves_with_path(stats)
             if p[-1].key == "mean"]
    variances = [v for p, v in jax.tree_util.tree_leaves_with_path(stats)
                 if p[-1].key == "var"]
  else:
    bns = [m for _, m in nnx.iter_modules(z.model)
           if isinstance(m, nnx.BatchNorm)]
    assert all(bn.use_running_average for bn in bns)
    means = [bn.mean[...] for bn in bns]
    variances = [bn.var[...] for bn in bns]
  assert len(means) >= 5
  for m, v in zip(means, variances, strict=True):
    assert np.any(np.asarray(m) != 0) and np.any(np.asarray(v) != 1)


# Constructs each family must contain (primitive name -> present).
EXPECTED = {
    "mobilenet_v2": ["conv_general_dilated", "min", "max", "add"],
    "resnet": ["conv_general_dilated", "reduce_window_max", "max", "add"],
    "transformer": ["dot_general", "erfc", "tanh", "exp", "rsqrt"],
    "unet": ["reduce_window_max", "concatenate"],
    "tcn": ["conv_general_dilated", "reduce_window_max",
            "reduce_window_sum"],
    "squeeze_excite": ["logistic", "mul", "reduce_sum"],
    "mlp_mixer": ["transpose", "dot_general", "tanh"],
    "causal_lm": ["dot_general", "select_n", "logistic", "rsqrt"],
    "rnn_classifier": ["dot_general", "logistic", "tanh", "rev"],
    "autoencoder": ["conv_general_dilated"],
    "graph_net": ["gather", "concatenate", "dot_general"],
    "diffusion_unet": ["sin", "cos", "concatenate", "exp"],
    "moe": ["dot_general", "exp"],
}


@pytest.mark.parametrize("name", [n for n in NAMES
                                  if n.split("/")[0] in EXPECTED])
def test_model_contains_its_constructs(name):
  family = name.split("/")[0]
  prims = primitives(name)
  missing = [p for p in EXPECTED[family] if not prims[p]]
  assert not missing, (missing, sorted(prims))
