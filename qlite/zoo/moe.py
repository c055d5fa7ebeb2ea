"""A tiny mixture-of-experts token model on float features [B, 8, 16]:
dense embedding, LayerNorm, a soft-routed MoE block (router Dense + softmax
over 4 experts; the experts are stacked weights ``experts_in`` [E, D, H] /
``experts_out`` [E, H, D] applied with ``jnp.einsum("btd,edh->bteh", ...)``
and a GELU; the expert outputs are combined by the router weights),
residual, dense per-token output head. Linen and NNX versions of one
architecture. The stacked expert weights are named ``experts_*`` (not
``kernel``), so the builders reseed them with fan-in D / H after the zoo's
generic init."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from qlite.zoo import base

SEQ_LEN = 8
IN_FEATURES = 16
D_MODEL = 32
NUM_EXPERTS = 4
EXPERT_DIM = 64
OUT_FEATURES = 16


def moe(x, router_logits, w_in, b_in, w_out, b_out):
  """Soft-routed experts on [B, T, D] tokens: every expert runs, the outputs
  are summed with the router's softmax weights [B, T, E]."""
  gates = jax.nn.softmax(router_logits, axis=-1)
  h = jnp.einsum("btd,edh->bteh", x, w_in) + b_in
  h = jax.nn.gelu(h)
  y = jnp.einsum("bteh,ehd->bted", h, w_out) + b_out
  return jnp.einsum("bte,bted->btd", gates, y)


class MoEBlock(nn.Module):
  """Router + stacked experts (Linen)."""

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    init = nn.initializers.lecun_normal()
    w_in = self.param("experts_in", init, (NUM_EXPERTS, d, EXPERT_DIM))
    b_in = self.param("experts_in_bias", nn.initializers.zeros,
                      (NUM_EXPERTS, EXPERT_DIM))
    w_out = self.param("experts_out", init, (NUM_EXPERTS, EXPERT_DIM, d))
    b_out = self.param("experts_out_bias", nn.initializers.zeros,
                       (NUM_EXPERTS, d))
    router = nn.Dense(NUM_EXPERTS, name="router")(x)
    return moe(x, router, w_in, b_in, w_out, b_out)


class MoEModel(nn.Module):
  """Embedding, LayerNorm, MoE block, residual, output head (Linen)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D_MODEL, name="embed")(x)
    x = x + MoEBlock(name="moe")(nn.LayerNorm(name="norm")(x))
    return nn.Dense(OUT_FEATURES, name="head")(x)


class MoEBlockNNX(nnx.Module):
  """Router + stacked experts (NNX)."""

  def __init__(self, d: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.router = nnx.Linear(d, NUM_EXPERTS, rngs=rngs)
    self.experts_in = nnx.Param(
        init(rngs.params(), (NUM_EXPERTS, d, EXPERT_DIM)))
    self.experts_in_bias = nnx.Param(jnp.zeros((NUM_EXPERTS, EXPERT_DIM)))
    self.experts_out = nnx.Param(
        init(rngs.params(), (NUM_EXPERTS, EXPERT_DIM, d)))
    self.experts_out_bias = nnx.Param(jnp.zeros((NUM_EXPERTS, d)))

  def __call__(self, x):
    return moe(x, self.router(x), self.experts_in[...],
               self.experts_in_bias[...], self.experts_out[...],
               self.experts_out_bias[...])


class MoEModelNNX(nnx.Module):
  """Embedding, LayerNorm, MoE block, residual, output head (NNX)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.embed = nnx.Linear(IN_FEATURES, D_MODEL, rngs=rngs)
    self.norm = nnx.LayerNorm(D_MODEL, rngs=rngs)
    self.moe = MoEBlockNNX(D_MODEL, rngs=rngs)
    self.head = nnx.Linear(D_MODEL, OUT_FEATURES, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    return self.head(x + self.moe(self.norm(x)))


def expert_weights(seed: int) -> tuple:
  """Seeded stacked expert kernels with per-expert fan-in scaling:
  ``experts_in`` [E, D, H] ~ N(0, 1/D), ``experts_out`` [E, H, D] ~
  N(0, 1/H)."""
  rng = np.random.default_rng(seed)
  w_in = rng.standard_normal((NUM_EXPERTS, D_MODEL, EXPERT_DIM)) / np.sqrt(
      D_MODEL)
  w_out = rng.standard_normal((NUM_EXPERTS, EXPERT_DIM, D_MODEL)) / np.sqrt(
      EXPERT_DIM)
  return (jnp.asarray(w_in, jnp.float32), jnp.asarray(w_out, jnp.float32))


def build_linen(seed: int = 0) -> base.ZooModel:
  """Returns the Linen MoE model with seeded weights."""
  batches = base.normal_batches((SEQ_LEN, IN_FEATURES), seed=seed + 1300)
  model = MoEModel()
  variables = base.init_linen(model, seed, batches[0][:1])
  params = dict(variables["params"])
  w_in, w_out = expert_weights(seed + 1)
  params["moe"] = {**params["moe"], "experts_in": w_in, "experts_out": w_out}
  variables = {**variables, "params": params}
  return base.ZooModel("moe/linen", model, variables,
                       base.example_from(batches), batches, "linen")


def build_nnx(seed: int = 0) -> base.ZooModel:
  """Returns the NNX MoE model with seeded weights."""
  batches = base.normal_batches((SEQ_LEN, IN_FEATURES), seed=seed + 1300)
  model = base.init_nnx(lambda rngs: MoEModelNNX(rngs=rngs), seed)
  w_in, w_out = expert_weights(seed + 1)
  model.moe.experts_in[...] = w_in
  model.moe.experts_out[...] = w_out
  return base.ZooModel("moe/nnx", model, None,
                       base.example_from(batches), batches, "nnx")
