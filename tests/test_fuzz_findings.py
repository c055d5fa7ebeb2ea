"""Reduced repros of tests/fuzz_models.py findings on the exp-form softmax
(rows over qlite.ops.softmax.SOFTMAX_EXP_ABOVE entries).

Seeds 147 and 184 of `python tests/fuzz_models.py 200` (heads_attention with
an additive causal mask over 134 / 136 tokens: 4.4 / 1.1 dB, LiteRT equal to
the fake-quant model, so export's self-check passes: silently wrong). Reduced
to one head: ``logits + (1 - tril) * -1e9`` before a 134-long softmax. The
add's output takes the -1e9 constant's range (scale 3.9e6 = 1e9 / 255 in
`qlite compare`), so every logit rounds to one code; the same mask as
``jnp.where`` (qlite.ops.masking) keeps the logits' range. Not fixed here
(the add's range is planned outside qlite/ops/softmax.py).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlite


class _CausalAttention(nn.Module):
  mask: str             # "additive" or "where"

  @nn.compact
  def __call__(self, x):
    t = x.shape[1]
    q, k, v = (nn.Dense(8)(x) for _ in range(3))
    logits = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(8.0)
    if self.mask == "additive":
      logits = logits + (1.0 - jnp.tril(jnp.ones((t, t)))) * -1e9
    else:
      logits = jnp.where(np.tril(np.ones((t, t), bool)), logits, -1e9)
    y = jnp.einsum("bts,bsd->btd", jax.nn.softmax(logits), v)
    return nn.Dense(5)(jnp.mean(y, 1))


def _sqnr(mask, t):
  model = _CausalAttention(mask)
  rng = np.random.default_rng(0)
  batches = [rng.uniform(-1, 1, size=(1, t, 8)).astype(np.float32)
             for _ in range(4)]
  v = model.init(jax.random.key(0), batches[0])
  rules = [qlite.QuantizationRule()]
  stats = qlite.calibrate(model, rules, batches, variables=v, progress=False)
  blob = qlite.export_tflite(model, rules, stats, batches[0], variables=v)
  assert qlite.inspect_tflite(blob).full_integer
  runner = qlite.TFLiteRunner(blob)
  ref = np.stack([np.asarray(model.apply(v, b)) for b in batches[:3]])
  out = np.stack([runner.run(b)[0] for b in batches[:3]])
  return qlite.metrics.sqnr_db(ref, out)


# measured (this file's models): where @ 134 31.0 dB, additive @ 100
# (SOFTMAX kernel) 26.4 dB, additive @ 134 (exp form) 0.4 dB
@pytest.mark.parametrize("mask, t", [("where", 134), ("additive", 100)])
def test_causal_mask_controls(mask, t):
  assert _sqnr(mask, t) > 20.0


@pytest.mark.xfail(strict=True, reason="fuzz seeds 147 / 184: an additive "
                   "mask before an exp-form softmax takes the -1e9 "
                   "constant's range (0.4 dB); remove the mark when fixed")
def test_additive_mask_before_exp_form_softmax():
  assert _sqnr("additive", 134) > 20.0
