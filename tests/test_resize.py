"""2x bilinear ``jax.image.resize`` traces as an ``odml.upsample_bilinear2d``
composite: JAX numbers unchanged, one RESIZE_BILINEAR in LiteRT (float and
int8), and the zoo U-Net exports with it."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import qlite
from qlite.trace import intercept
from qlite.annotate import ConversionProvider
from qlite.litert import convert as litert
from qlite.demo import run_tflite_batched
from qlite.metrics import sqnr_db
from qlite.quant.provider import QuantizedModel
from qlite.zoo import registry

NAME = "odml.upsample_bilinear2d"


def _up2(x):
  n, h, w, c = x.shape
  return jax.image.resize(x, (n, 2 * h, 2 * w, c), "bilinear")


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    if e.primitive.name != "composite":    # not into its decomposition
      for sub in jax.extend.core.jaxprs_in_params(e.params):
        yield from _eqns(sub)


def _composite_eqns(fn, *avals):
  with intercept.active():
    jaxpr = jax.make_jaxpr(fn)(*avals)
  return [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "composite"
          and e.params["name"] == NAME]


def _x(shape, seed=0):
  return np.random.default_rng(seed).uniform(-3, 3, shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 4), (1, 16, 16, 16),
                                   (1, 7, 2, 3)])
def test_composite_matches_jax_bilinear(shape):
  x = _x(shape)
  eqns = _composite_eqns(_up2, x)
  assert len(eqns) == 1
  # The image is the composite's only operand (the converter's pattern
  # matches nothing else), size is i64[2], align_corners False.
  assert len(eqns[0].invars) == 1
  attrs = {k: v for k, v, _ in eqns[0].params["attributes"]}
  size = np.asarray(getattr(attrs["size"][0], "val", attrs["size"][0]))
  assert size.tolist() == [2 * shape[1], 2 * shape[2]]
  assert size.dtype == np.int64
  assert attrs["align_corners"] == (False,)
  assert set(attrs) == {"size", "align_corners"}
  with intercept.active():
    got = np.asarray(jax.jit(_up2)(x))
  want = np.asarray(_up2(x))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_vmap_of_jitted_resize_keeps_the_composite():
  x = _x((3, 2, 4, 6, 5))
  with intercept.active():
    f = jax.vmap(jax.jit(_up2))
    got = np.asarray(f(x))
    jaxpr = jax.make_jaxpr(f)(x)
  want = np.stack([np.asarray(_up2(v)) for v in x])
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  assert NAME in str(jaxpr)


@pytest.mark.parametrize("fn", [
    lambda x: jax.image.resize(x, (1, 12, 12, 3), "bilinear"),    # 3x
    lambda x: jax.image.resize(x, (1, 8, 8, 3), "nearest"),
    lambda x: jax.image.resize(x, (1, 8, 4, 3), "bilinear"),      # 2x, 1x
    lambda x: jax.image.resize(x, (1, 8, 8, 3), "bicubic"),
])
def test_other_resizes_are_left_alone(fn):
  x = _x((1, 4, 4, 3))
  assert not _composite_eqns(fn, x)
  with intercept.active():
    got = np.asarray(jax.jit(fn)(x))
  np.testing.assert_array_equal(got, np.asarray(fn(x)))


def _ops(blob):
  return [op.name for op in qlite.inspect_tflite(blob).ops]


def test_litert_float_resize_bilinear_matches_jax():
  # LiteRT's RESIZE_BILINEAR (half_pixel_centers) clamps at the edges as
  # jax's bilinear does: the float .tflite gives jax's numbers.
  x = _x((3, 9, 6, 5))
  with intercept.active():
    blob = litert.convert_function(
        _up2, [jax.ShapeDtypeStruct((1,) + x.shape[1:], jnp.float32)],
        quantized=False)
  assert _ops(blob) == ["RESIZE_BILINEAR"]
  lite = np.asarray(run_tflite_batched(blob, x))
  np.testing.assert_allclose(lite, np.asarray(_up2(x)), rtol=0, atol=2e-6)


@pytest.fixture(scope="module")
def unet_export():
  z = registry.get("unet/linen")
  rules = [qlite.QuantizationRule()]
  stats = qlite.calibrate(z.model, rules, z.batches, variables=z.variables,
                          progress=False)
  blob = qlite.export_tflite(z.model, rules, stats, z.example_args,
                             variables=z.variables)
  return z, rules, stats, blob


def test_unet_is_full_integer_with_one_resize_bilinear(unet_export):
  *_, blob = unet_export
  info = qlite.inspect_tflite(blob)
  assert info.full_integer
  hist = info.op_histogram
  assert hist["RESIZE_BILINEAR"] == 1 and hist["RESIZE_NEAREST_NEIGHBOR"] == 1
  for gone in ("DEPTHWISE_CONV_2D", "SLICE", "STABLEHLO_COMPOSITE"):
    assert gone not in hist, hist
  # QUANTIZE / DEQUANTIZE at the interface only, 14 ops in all
  # (TF's converter: 18).
  assert hist["QUANTIZE"] == 1 and hist["DEQUANTIZE"] == 1
  assert sum(hist.values()) == 14, hist
  resize = [op for op in info.ops if op.name == "RESIZE_BILINEAR"][0]
  t_in, t_out = info.tensor(resize.inputs[0]), info.tensor(resize.outputs[0])
  assert t_in.dtype == t_out.dtype == "INT8"
  # The int8 kernel does not rescale: one scale and zero point.
  assert (t_in.scale, t_in.zero_point) == (t_out.scale, t_out.zero_point)


def test_unet_litert_matches_fake_quant_and_float(unet_export):
  z, rules, stats, blob = unet_export
  x = np.concatenate(z.batches[:4])
  fake = np.asarray(qlite.quantize_model(
      z.model, ConversionProvider(rules, stats),
      variables=z.variables).apply(z.variables, x))
  lite = np.asarray(run_tflite_batched(blob, x))
  flt = np.asarray(z.model.apply(z.variables, x))
  info = qlite.inspect_tflite(blob)
  assert info.ops[-1].name == "DEQUANTIZE"
  lsb = float(info.tensor(info.ops[-1].inputs[0]).scale[0])
  # Measured: max 2 LSB, mean 0.22 LSB (LiteRT's int8 RESIZE_BILINEAR
  # rounds the many exact halves of the 1/16 weights up, jnp.round to even).
  assert np.max(np.abs(fake - lite)) <= 2 * lsb + 1e-6
  assert np.mean(np.abs(fake - lite)) <= 0.35 * lsb
  assert sqnr_db(flt, lite) >= 32.0     # measured 33.5 dB


def test_unet_resize_input_and_output_share_one_range(unet_export):
  # RESIZE_BILINEAR's int8 kernel reads its input at the output's scale, so
  # the plan joins dec2's output, the resize and the skip concat (with
  # enc1's output): the converter then moves no scale and the fake-quant
  # model rounds where LiteRT does.
  z, rules, stats, _ = unet_export
  _, plan = QuantizedModel(z.model, ConversionProvider(rules, stats),
                           z.variables).traced(z.example_args)
  by_key = plan.boundary_by_key()
  group = {"dec2/conv_general_dilated", NAME, "enc1/conv_general_dilated",
           "concatenate:1"}
  for k in group:
    assert {o.key for o in by_key[k].shares_with} == group - {k}
