"""bfloat16 models on the XLA backend: their dots are quantized like float32
ones (numpy's issubdtype says bfloat16 is not floating; the tracer once took
that and left every bf16 weight float, silently: output equal to float)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlite
from qlite import xla
from qlite.metrics import sqnr_db


class _Bf16Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    return nn.Dense(64, **kw)(nn.relu(nn.Dense(256, **kw)(x)))


@pytest.mark.parametrize("rule", [
    dict(weight_qtype="int8", act_qtype=None),          # weight-only
    dict(act_static_scale=False),                       # DRQ
], ids=["weight_only", "drq"])
def test_bf16_dots_are_quantized(rule):
  m = _Bf16Mlp()
  x = jnp.asarray(np.random.RandomState(0).randn(8, 128), jnp.bfloat16)
  v = m.init(jax.random.key(0), x)
  rules = [qlite.QuantizationRule(**rule)]
  qm = xla.quantize_model(m, xla.PtqProvider(rules), x, variables=v)
  y, yq = m.apply(v, x), qm(x)
  assert yq.dtype == jnp.bfloat16
  f32 = lambda a: np.asarray(a, np.float32)
  assert not np.array_equal(f32(y), f32(yq))       # it is quantized
  assert sqnr_db(f32(y), f32(yq)) > 25.0
  abstract = xla.abstract_quantized_params(m, rules, x, variables=v)
  qp = xla.quantize_params(v, abstract)
  kernels = [qp["params"][d]["kernel"] for d in ("Dense_0", "Dense_1")]
  assert all(type(k).__name__ == "QArray" for k in kernels)
  assert all(k.qvalue.dtype == jnp.int8 for k in kernels)
