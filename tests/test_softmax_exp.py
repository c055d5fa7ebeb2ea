"""A softmax over more than ``SOFTMAX_EXP_ABOVE`` entries traces as
``exp(x - max) * (1 / sum)`` (qlite/ops/softmax.py): its probabilities get a
calibrated int8 scale instead of the SOFTMAX kernel's fixed 1/256, which is
coarser than the mean probability of a 196-token row. Shorter rows keep the
SOFTMAX kernel; attention masks before a long softmax keep working."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlite
from qlite.ops import softmax
from qlite.trace import graph

from attention_models import HeadsAttention

RULES = [qlite.QuantizationRule()]
T = 196                                  # ViT-S/16's tokens


class Attention(nn.Module):
  """One head of self-attention over ``t`` tokens (d 16)."""
  masked: bool = False

  @nn.compact
  def __call__(self, x):
    t = x.shape[1]
    q, k, v = (nn.Dense(16, name=n)(x) for n in ("q", "k", "v"))
    logits = jnp.einsum("btd,bsd->bts", q, k) / 4.0
    if self.masked:
      logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
    return nn.Dense(16, name="out")(
        jnp.einsum("bts,bsd->btd", jax.nn.softmax(logits), v))


def _batches(n, t, seed):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(1, t, 16)).astype(np.float32) for _ in range(n)]


def _export(model, t, above=None, monkeypatch=None):
  """(blob, held-out SQNR vs float, op histogram)."""
  if above is not None:
    monkeypatch.setattr(softmax, "SOFTMAX_EXP_ABOVE", above)
  graph._TRACE_CACHE.clear()
  graph._FOLD_CACHE.clear()
  calib, held = _batches(4, t, 0), _batches(2, t, 1)
  v = model.init(jax.random.PRNGKey(0), calib[0])
  stats = qlite.calibrate(model, RULES, calib, variables=v, progress=False)
  blob = qlite.export_tflite(model, RULES, stats, calib[0], variables=v)
  graph._TRACE_CACHE.clear()
  graph._FOLD_CACHE.clear()
  runner = qlite.TFLiteRunner(blob)
  out = np.concatenate([runner.run(x)[0] for x in held])
  ref = np.concatenate([np.asarray(model.apply(v, x)) for x in held])
  info = qlite.inspect_tflite(blob)
  assert info.full_integer
  return qlite.metrics.sqnr_db(ref, out), info.op_histogram


@pytest.mark.parametrize("fill", [-1e9, -np.inf])
def test_exp_form_is_softmax_in_float(fill):
  rng = np.random.default_rng(0)
  x = rng.normal(0, 3, (3, 200)).astype(np.float32)
  x[1, 50:] = fill                        # a masked row
  want = np.asarray(jax.nn.softmax(jnp.asarray(x)))
  got = np.asarray(softmax.softmax_exp(jnp.asarray(x)))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
  # masked entries weigh at most exp(-EXP_FLOOR) of the largest
  assert np.all(got[1, 50:] <= 1.001 * np.exp(-softmax.EXP_FLOOR) * got[1].max())


def test_long_softmax_exp_form_beats_the_softmax_kernel(monkeypatch):
  # Measured: 196 tokens, held-out rows: SOFTMAX kernel 21.8 dB, exp form
  # 27.6 dB.
  exp_db, ops = _export(Attention(), T)
  assert "SOFTMAX" not in ops and ops.get("EXP") == 1
  kernel_db, kops = _export(Attention(), T, above=10**9,
                            monkeypatch=monkeypatch)
  assert kops.get("SOFTMAX") == 1 and "EXP" not in kops
  assert exp_db > kernel_db + 4.0, (exp_db, kernel_db)


def test_short_softmax_keeps_the_kernel():
  _, ops = _export(Attention(), 32)
  assert ops.get("SOFTMAX") == 1 and "EXP" not in ops


def test_masked_long_softmax_exports():
  # The -1e9 fill before the exp form takes the logits' range
  # (qlite.ops.masking.feeds_softmax): measured 24.2 dB (-0.2 dB before,
  # the fill in the select's int8 range; the SOFTMAX kernel: 25.0 dB, the
  # causal rows' sums span 1 .. 196, a coarse grid for 1 / sum).
  db, ops = _export(Attention(masked=True), T)
  assert "SOFTMAX" not in ops and ops.get("EXP") == 1
  assert ops.get("SELECT") == 1
  assert db > 22.0, db


def test_exp_form_probabilities_are_not_read_at_zero_point_0(monkeypatch):
  # An int8 activation x activation matmul reads its right-hand side at zero
  # point 0; the probabilities are >= 0, so the plan swaps the operands (V
  # at zero point 0), as for a SOFTMAX. Measured: 24.9 dB swapped, 21.2 dB
  # with the probabilities symmetric.
  from qlite.litert.providers import ConversionProvider
  from qlite.quant.provider import QuantizedModel
  m = HeadsAttention()
  calib = _batches(2, T, 0)
  v = m.init(jax.random.PRNGKey(0), calib[0])
  stats = qlite.calibrate(m, RULES, calib, variables=v, progress=False)
  g, plan = QuantizedModel(m, ConversionProvider(RULES, stats), v).traced(
      (calib[0],))
  probs = [var for var in plan.boundaries
           if softmax.is_exp_form_output(g, var)]
  assert len(probs) == 1
  assert not plan.boundaries[probs[0]].zero_point_zero
  assert len(plan.swapped) == 1
  swapped_db, _ = _export(m, T)
  monkeypatch.setattr(softmax, "is_exp_form_output", lambda g, v: False)
  symmetric_db, _ = _export(m, T)
  assert swapped_db > symmetric_db + 2.0, (swapped_db, symmetric_db)
