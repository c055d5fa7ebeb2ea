"""Transposed convolutions and weights with a batch / group axis (issue 15
items 4 and 5).

* ``nn.ConvTranspose`` / ``nnx.ConvTranspose`` / ``lax.conv_transpose``
  trace as a sub-pixel CONV_2D + depth-to-space (qlite/ops/conv.py): the
  converter's own TRANSPOSE_CONV stays float. The rewrite is checked
  against flax's float outputs, then exported full-integer.
* A constant ``dot_general`` operand with batch dimensions (``nn.Einsum``
  ``"bgi,gio->bgo"``, ``nn.vmap(nn.Dense, variable_axes={"params": 0})``,
  expert stacks) is BATCH_MATMUL's right-hand side, quantized per tensor
  (qlite/ops/fully_connected.py): per channel, LiteRT returned all zeros.

Every export runs the default self-check (``verify="error"``: LiteRT
within 4 LSB or 3 dB of the fake-quant model); SQNR vs float is measured
on held-out batches at the export's batch size.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import qlite
from qlite.trace import intercept

RULES = [qlite.QuantizationRule()]
BIAS = nn.initializers.normal(0.5)     # a nonzero bias shows where it went


def _batches(shape, n, seed):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def _export_and_measure(model, shape, variables=None, calib=8, held_out=3):
  """Calibrates, exports (default self-check), returns (info, SQNR of
  LiteRT vs float on held-out batches)."""
  apply = (lambda x: model(x)) if variables is None else \
      (lambda x: model.apply(variables, x))
  batches = _batches(shape, calib, seed=0)
  stats = qlite.calibrate(model, RULES, batches, variables=variables,
                          progress=False)
  blob = qlite.export_tflite(model, RULES, stats, batches[0],
                             variables=variables)
  info = qlite.inspect_tflite(blob)
  runner = qlite.TFLiteRunner(blob)
  held = _batches(shape, held_out, seed=1)
  ref = np.stack([np.asarray(apply(x)) for x in held])
  out = np.stack([runner.run(x)[0] for x in held])
  return info, qlite.metrics.sqnr_db(ref, out)


# -- transposed convolution: the rewrite is the same float function

def _lax_cases():
  pads = ("SAME", "VALID", ((1, 2),), ((0, 0),), ((-1, 2),), ((3, 1),))
  for nsp, k, s, d, pad, tk in itertools.product(
      (1, 2), (1, 2, 3, 4), (2, 3), (1, 2), pads, (False, True)):
    if (k + s + d + len(str(pad))) % 3 == 0:     # a spread-out third
      yield nsp, k, s, d, pad, tk


@pytest.mark.parametrize("nsp,k,s,d,pad,tk", list(_lax_cases()))
def test_subpixel_rewrite_equals_lax_conv_transpose(nsp, k, s, d, pad, tk):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *(7, 5)[:nsp], 3)).astype(np.float32)
  io = (4, 3) if tk else (3, 4)      # transpose_kernel swaps I and O
  w = rng.standard_normal((*(k,) * nsp, *io)).astype(np.float32)
  pad = pad if isinstance(pad, str) else pad * nsp
  f = lambda x, w: lax.conv_transpose(x, w, (s,) * nsp, pad,
                                      rhs_dilation=(d,) * nsp,
                                      transpose_kernel=tk)
  ref = f(x, w)
  with intercept.active():
    jaxpr = jax.make_jaxpr(f)(x, w)
    out = jax.jit(f)(x, w)
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 1
  assert set(convs[0].params["lhs_dilation"]) == {1}     # no dilated input
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=2e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("dn", [("NCHW", "OIHW", "NCHW"),
                                ("NHWC", "OIHW", "NCHW"),
                                ("NCH", "OIH", "NHC")])
def test_lhs_dilated_conv_with_other_layouts(dn):
  rng = np.random.default_rng(0)
  nsp = len(dn[0]) - 2
  x = rng.standard_normal((2, 3, *(7, 5)[:nsp])).astype(np.float32)
  if dn[0] == "NHWC":
    x = np.moveaxis(x, 1, -1)
  w = rng.standard_normal((4, 3, *(3,) * nsp)).astype(np.float32)
  f = lambda x, w: lax.conv_general_dilated(
      x, w, (1,) * nsp, ((1, 2),) * nsp, lhs_dilation=(2,) * nsp,
      dimension_numbers=dn)
  ref = f(x, w)
  with intercept.active():
    out = jax.jit(f)(x, w)
  np.testing.assert_allclose(out, ref, atol=2e-5 * float(np.abs(ref).max()))


MODULE_CASES = [  # (spatial dims, kernel, stride, padding, transpose_kernel)
    (2, 3, 2, "SAME", False), (2, 4, 2, "SAME", False),
    (2, 3, 2, "VALID", False), (2, 4, 2, ((1, 2), (1, 2)), False),
    (2, 3, 2, 1, True), (2, 5, 3, "SAME", False),
    (2, 3, 2, "CIRCULAR", False),      # flax's own code, lax rewrite inside
    (1, 3, 2, "SAME", False), (1, 4, 2, "VALID", True),
    (1, 3, 2, ((2, 1),), False)]


@pytest.mark.parametrize("nsp,k,s,pad,tk", MODULE_CASES)
def test_flax_conv_transpose_rewrite_equals_flax(nsp, k, s, pad, tk):
  x = _batches((2, *(6, 5)[:nsp], 3), 1, seed=0)[0]
  linen = nn.ConvTranspose(4, (k,) * nsp, (s,) * nsp, padding=pad,
                           transpose_kernel=tk, bias_init=BIAS)
  v = linen.init(jax.random.key(0), x)
  ref = linen.apply(v, x)
  with intercept.active():
    out = jax.jit(linen.apply)(v, x)
    v2 = linen.init(jax.random.key(0), x)      # same params under the rewrite
  assert jax.tree.map(np.shape, v2) == jax.tree.map(np.shape, v)
  np.testing.assert_allclose(out, ref, atol=2e-5 * float(np.abs(ref).max()))
  m = nnx.ConvTranspose(3, 4, (k,) * nsp, (s,) * nsp, padding=pad,
                        transpose_kernel=tk, bias_init=BIAS, rngs=nnx.Rngs(0))
  ref = m(x)
  with intercept.active():
    out = m(x)
  np.testing.assert_allclose(out, ref, atol=2e-5 * float(np.abs(ref).max()))


# -- transposed convolution: full-integer exports

EXPORT_CASES = [  # (spatial dims, kernel, padding), stride 2
    (2, 3, "SAME"), (2, 4, "VALID"), (2, 3, ((1, 2), (1, 2))),
    (1, 3, "SAME"), (1, 4, "VALID"), (1, 3, ((2, 1),))]


def _conv_transpose_model(framework, nsp, k, pad):
  if framework == "linen":
    model = nn.ConvTranspose(4, (k,) * nsp, (2,) * nsp, padding=pad,
                             bias_init=BIAS)
    shape = (2, *(8, 8)[:nsp], 3)
    return model, model.init(jax.random.key(0), np.zeros(shape, np.float32)), \
        shape
  model = nnx.ConvTranspose(3, 4, (k,) * nsp, (2,) * nsp, padding=pad,
                            bias_init=BIAS, rngs=nnx.Rngs(0))
  return model, None, (2, *(8, 8)[:nsp], 3)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
@pytest.mark.parametrize("nsp,k,pad", EXPORT_CASES)
def test_conv_transpose_exports_full_integer(framework, nsp, k, pad):
  model, v, shape = _conv_transpose_model(framework, nsp, k, pad)
  info, sqnr = _export_and_measure(model, shape, v)
  assert info.full_integer
  ops = info.op_histogram
  assert ops.get("CONV_2D") == 1 and "TRANSPOSE_CONV" not in ops
  assert "ADD" not in ops              # the bias fused into CONV_2D
  assert sqnr >= 25.0, sqnr            # measured 36.2-41.5 dB


class LinenDecoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.ConvTranspose(8, (3, 3), (2, 2))(x))
    x = nn.relu(nn.ConvTranspose(4, (4, 4), (2, 2), padding="VALID")(x))
    return nn.Conv(1, (3, 3))(x)


class NnxDecoder(nnx.Module):
  def __init__(self, rngs):
    self.up1 = nnx.ConvTranspose(8, 8, (3, 3), (2, 2), rngs=rngs)
    self.up2 = nnx.ConvTranspose(8, 4, (4, 4), (2, 2), padding="VALID",
                                 rngs=rngs)
    self.out = nnx.Conv(4, 1, (3, 3), rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.up2(nnx.relu(self.up1(x)))))


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_decoder_exports_full_integer(framework):
  shape = (2, 4, 4, 8)
  if framework == "linen":
    model = LinenDecoder()
    v = model.init(jax.random.key(0), np.zeros(shape, np.float32))
  else:
    model, v = NnxDecoder(nnx.Rngs(0)), None
  # 8 calibration batches of 2 clip held-out outputs (28.1 dB, linen)
  info, sqnr = _export_and_measure(model, shape, v, calib=16)
  assert info.full_integer and info.op_histogram["CONV_2D"] == 3
  assert "TRANSPOSE_CONV" not in info.op_histogram
  assert sqnr >= 25.0, sqnr            # measured 33.6 (linen), 36.4 dB (nnx)


class LaxConvTranspose(nn.Module):
  """lax.conv_transpose / nn.Conv(input_dilation) written by hand: the
  rewrite runs at the conv, the bias stays its own int8 ADD."""
  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.lecun_normal(), (3, 3, 4, 3))
    y = lax.conv_transpose(x, w, (2, 2), "SAME", transpose_kernel=True)
    y = nn.relu(y + self.param("b", BIAS, (4,)))
    return nn.Conv(4, (3, 3), input_dilation=2, padding=((1, 2), (1, 2)))(y)


def test_hand_written_lhs_dilated_convs_export_full_integer():
  model = LaxConvTranspose()
  shape = (2, 6, 6, 3)
  v = model.init(jax.random.key(0), np.zeros(shape, np.float32))
  info, sqnr = _export_and_measure(model, shape, v)
  assert info.full_integer and info.op_histogram["CONV_2D"] == 2
  assert "TRANSPOSE_CONV" not in info.op_histogram
  assert sqnr >= 25.0, sqnr            # measured 33.7 dB


# -- weights with a batch / group axis

class VmapDense(nn.Module):
  @nn.compact
  def __call__(self, x):                    # x: (batch, groups, in)
    return nn.vmap(nn.Dense, variable_axes={"params": 0},
                   split_rngs={"params": True}, in_axes=1, out_axes=1)(
                       3, bias_init=BIAS)(x)


class NnxVmapLinear(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=4)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(6, 3, bias_init=BIAS, rngs=rngs)
    self.groups = make(rngs)

  def __call__(self, x):
    @nnx.vmap(in_axes=(0, 1), out_axes=1)
    def apply(m, x):
      return m(x)
    return apply(self.groups, x)


class LinenExperts(nn.Module):
  """Expert stack: every expert on every token ('gi,eio->geo', no batch
  dims: FULLY_CONNECTED), or tokens already dispatched per expert
  ('eti,eio->eto': BATCH_MATMUL), then a softmax-gated mix."""
  dispatched: bool = False

  @nn.compact
  def __call__(self, x):
    w = self.param("experts", nn.initializers.lecun_normal(), (4, 6, 5))
    if self.dispatched:                     # x: (experts, tokens, in)
      return jnp.einsum("eti,eio->eto", x, w)
    y = jnp.einsum("gi,eio->geo", x, w)     # x: (tokens, in)
    gate = jax.nn.softmax(nn.Dense(4)(x))
    return jnp.einsum("ge,geo->go", gate, y)


class NnxExperts(nnx.Module):
  def __init__(self, rngs, dispatched=False):
    self.dispatched = dispatched
    self.experts = nnx.Param(nnx.initializers.lecun_normal()(
        rngs.params(), (4, 6, 5)))
    self.router = nnx.Linear(6, 4, rngs=rngs)

  def __call__(self, x):
    w = self.experts[...]
    if self.dispatched:
      return jnp.einsum("eti,eio->eto", x, w)
    y = jnp.einsum("gi,eio->geo", x, w)
    return jnp.einsum("ge,geo->go", jax.nn.softmax(self.router(x)), y)


GROUP_CASES = {
    "einsum_bgi_gio/linen": (lambda: nn.Einsum((4, 6, 3), "bgi,gio->bgo",
                                               bias_init=BIAS), (8, 4, 6)),
    "einsum_bgi_gio/nnx": (lambda: nnx.Einsum("bgi,gio->bgo", (4, 6, 3),
                                              (4, 3), bias_init=BIAS,
                                              rngs=nnx.Rngs(0)), (8, 4, 6)),
    "vmap_dense/linen": (VmapDense, (8, 4, 6)),
    "vmap_dense/nnx": (lambda: NnxVmapLinear(nnx.Rngs(0)), (8, 4, 6)),
    "experts_dispatched/linen": (lambda: LinenExperts(dispatched=True),
                                 (4, 8, 6)),
    "experts_dispatched/nnx": (lambda: NnxExperts(nnx.Rngs(0), True),
                               (4, 8, 6)),
    "experts_gated/linen": (LinenExperts, (16, 6)),
    "experts_gated/nnx": (lambda: NnxExperts(nnx.Rngs(0)), (16, 6)),
}


@pytest.mark.parametrize("name", sorted(GROUP_CASES))
def test_grouped_weights_export_faithful(name):
  make, shape = GROUP_CASES[name]
  model = make()
  v = None
  if name.endswith("/linen"):
    v = model.init(jax.random.key(0), np.zeros(shape, np.float32))
  info, sqnr = _export_and_measure(model, shape, v, calib=16)
  assert info.full_integer
  if "gated" not in name:
    assert info.op_histogram.get("BATCH_MATMUL") == 1
    weights = [t for t in info.tensors if t.is_constant and t.dtype == "INT8"
               and len(t.shape) == 3 and t.shape[-2:] in ((6, 3), (6, 5))]
    assert len(weights) == 1 and not weights[0].per_channel
  assert sqnr >= 25.0, sqnr            # measured 33.2-39.7 dB
