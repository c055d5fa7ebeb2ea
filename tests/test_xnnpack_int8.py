"""int8 ops LiteRT's XNNPACK delegate takes (else the builtin kernels run
them, up to 25x slower): the right-hand side of a product of two
activations at zero point 0 (int8 BATCH_MATMUL), the operands of a
probabilities x values product swapped so the values are that side, and
ADD / SUB constants at no less than 2**-10 of the output scale."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

import qlite
from qlite.ops.fully_connected import FullyConnected
from qlite.trace.graph import Node

from attention_models import HeadsAttention

RULES = [qlite.QuantizationRule()]


class FlaxAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(x)


class ZeroBetaLayerNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(12)(nn.LayerNorm()(nn.Dense(24)(x)))


def _export(model, seed=0):
  rng = np.random.default_rng(seed)
  batches = [rng.normal(size=(2, 10, 12)).astype(np.float32)
             for _ in range(4)]
  variables = model.init(jax.random.PRNGKey(seed), batches[0])
  stats = qlite.calibrate(model, RULES, batches, variables=variables,
                          progress=False)
  blob = qlite.export_tflite(model, RULES, stats, batches[0][:1],
                             variables=variables)   # self-checks vs fake-quant
  ref = model.apply(variables, batches[3][:1])
  out = qlite.TFLiteRunner(blob).run(batches[3][:1])[0]
  return blob, qlite.metrics.sqnr_db(np.asarray(ref), out)


def _ops(blob):
  it = Interpreter(model_content=blob)
  it.allocate_tensors()
  tensors = {t["index"]: t for t in it.get_tensor_details()}
  return [(o["op_name"], [tensors.get(i) for i in o["inputs"]],
           [tensors[i] for i in o["outputs"]])
          for o in it._get_ops_details()]


def _qp(t):
  q = t["quantization_parameters"]
  return float(q["scales"][0]), int(q["zero_points"][0])


@pytest.mark.parametrize("model", [HeadsAttention(), FlaxAttention()],
                         ids=["einsum", "flax_mha"])
def test_attention_products_read_rhs_at_zero_point_0(model):
  blob, sqnr = _export(model)
  bmm = [(ins, outs) for name, ins, outs in _ops(blob)
         if name == "BATCH_MATMUL"]
  assert len(bmm) == 2
  for ins, _ in bmm:
    scale, zp = _qp(ins[1])
    assert zp == 0, (ins[1]["name"], zp)
    # never the softmax's probabilities (fixed scale 1/256, zero point -128)
    assert abs(scale - 1 / 256) > 1e-6
  # the probabilities are the left-hand side of the second product
  assert any(_qp(ins[0]) == (pytest.approx(1 / 256), -128) for ins, _ in bmm)
  assert sqnr > 25.0, sqnr


@pytest.mark.parametrize("dims,shapes", [
    ((((3,), (2,)), ((0, 1), (0, 1))), ((2, 3, 5, 4), (2, 3, 4, 6))),
    ((((3,), (3,)), ((0, 1), (0, 1))), ((2, 3, 5, 4), (2, 3, 6, 4))),
    ((((2,), (3,)), ((0, 1), (0, 2))), ((2, 3, 4, 5), (2, 6, 3, 4))),
    ((((1,), (0,)), ((), ())), ((5, 4), (4, 7))),
])
def test_lower_swapped_equals_the_product(dims, shapes):
  rng = np.random.default_rng(1)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)
  want = jax.lax.dot_general(a, b, dims)
  params = dict(dimension_numbers=dims, precision=None,
                preferred_element_type=jnp.float32, out_sharding=None)
  node = Node(index=0, prim=jax.lax.dot_general_p, params=params,
              inputs=[0, 1], outputs=[2], module_path="", source="")
  got, = FullyConnected().lower_swapped(node, [a, b])
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5)


def _constant_tensors(blob) -> set[int]:
  """Indices of the tensors the file stores data for (constants)."""
  m = schema.ModelT.InitFromPackedBuf(blob, 0)
  return {i for i, t in enumerate(m.subgraphs[0].tensors)
          if m.buffers[t.buffer].data is not None and
          len(m.buffers[t.buffer].data) > 0}


def test_add_sub_constants_within_xnnpack_scale_ratio():
  """A zero LayerNorm beta and its eps (own scales ~1e-8) are quantized at
  2**-9 of the op's output scale: XNNPACK runs an int8 ADD / SUB only when
  every input scale is >= 2**-10 of the output's."""
  blob, sqnr = _export(ZeroBetaLayerNorm())
  consts = _constant_tensors(blob)
  checked = 0
  for name, ins, outs in _ops(blob):
    if name not in ("ADD", "SUB"):
      continue
    out_scale = _qp(outs[0])[0]
    for t in ins:
      if t is not None and t["index"] in consts:
        assert _qp(t)[0] >= out_scale * 2.0 ** -10, (name, t["name"])
        checked += 1
  assert checked >= 2       # eps + beta
  assert sqnr > 30.0, sqnr
