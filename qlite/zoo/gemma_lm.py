"""A Gemma-style decoder language model with an explicit KV cache, for
on-device export as ``prefill`` + ``decode`` signatures (issue 18).

Each block: RMSNorm, grouped-query attention with rotary position
embeddings, residual, RMSNorm, GELU-gated MLP, residual; embeddings scaled
by ``sqrt(d_model)`` and tied with the output projection (logits
``= h @ embed.T``). Linen (:class:`GemmaLM`) and NNX (:class:`GemmaLMNNX`)
versions of one architecture, with the same three entry points:

- ``__call__(ids)``: full-sequence causal forward, int32 ids ``[B, T]`` ->
  logits ``[B, T, V]`` (no cache; the reference the cached path must match).
- ``prefill(ids, length, *caches)``: a prompt padded to a static length
  ``T``; writes keys / values of positions ``0..T-1`` into the caches and
  returns ``(logits [B, V] at position length - 1, *new_caches)``.
- ``decode(ids, pos, *caches)``: one token ``[B, 1]`` at position ``pos``;
  returns ``(logits [B, V], *new_caches)``.

``caches`` is the flat tuple ``(k_0, v_0, k_1, v_1, ...)``, each
``[B, max_len, num_kv_heads, head_dim]`` float32, updated with
``lax.dynamic_update_slice`` at the position. Positions past the current
one hold padding or stale values and are masked out (a key at ``s`` is seen
by a query at ``p`` only when ``s <= p``), so a padded prompt needs no
extra mask.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Sizes of a :class:`GemmaLM` / :class:`GemmaLMNNX`.

  ``num_heads`` query heads share ``num_kv_heads`` key / value heads
  (grouped-query attention; ``num_heads % num_kv_heads == 0``); ``max_len``
  is the KV-cache length (prompt + generated tokens).
  """
  vocab: int = 256
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 128
  max_len: int = 64
  rope_base: float = 10000.0
  # True: the embedding lookup is an odml.embedding_lookup composite (LiteRT
  # EMBEDDING_LOOKUP, shares the tied weight; for the weight formats).
  # False: a plain take (qlite's full-integer export quantizes that one).
  composite_lookup: bool = True

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even, got {self.head_dim}")

  def cache_shape(self, batch: int = 1) -> tuple:
    """Shape of one layer's key (or value) cache."""
    return (batch, self.max_len, self.num_kv_heads, self.head_dim)

  def empty_caches(self, batch: int = 1) -> tuple:
    """The flat ``(k_0, v_0, ...)`` tuple of zero float32 caches."""
    return tuple(np.zeros(self.cache_shape(batch), np.float32)
                 for _ in range(2 * self.num_layers))

  def param_count(self) -> int:
    """Number of parameters (the tied embedding counted once)."""
    d, h, kv, hd = self.d_model, self.num_heads, self.num_kv_heads, \
        self.head_dim
    attn = d * h * hd * 2 + d * kv * hd * 2
    block = attn + 3 * d * self.mlp_dim + 2 * d
    return self.vocab * d + self.num_layers * block + d


# The configuration of the tests (tiny) and of bench/lm.py (~40M params).
TINY = LMConfig()
BENCH = LMConfig(vocab=32000, d_model=512, num_layers=8, num_heads=8,
                 num_kv_heads=2, head_dim=64, mlp_dim=1536, max_len=256)


def rope_tables(cfg: LMConfig) -> tuple[np.ndarray, np.ndarray]:
  """``(sin, cos)`` float32 tables ``[max_len, head_dim // 2]`` of the
  rotary angles ``p / base ** (2i / head_dim)``."""
  half = cfg.head_dim // 2
  inv = 1.0 / (cfg.rope_base ** (np.arange(half, dtype=np.float64) * 2
                                  / cfg.head_dim))
  ang = np.arange(cfg.max_len, dtype=np.float64)[:, None] * inv[None, :]
  return np.sin(ang).astype(np.float32), np.cos(ang).astype(np.float32)


def apply_rope(x, pos0, cfg: LMConfig):
  """Rotates [B, T, H, D] ``x`` at positions ``pos0 .. pos0 + T - 1``
  (``pos0`` an int32 scalar, traced or static): the sin / cos rows are a
  dynamic slice of constant tables."""
  t, half = x.shape[1], cfg.head_dim // 2
  sin_t, cos_t = rope_tables(cfg)
  sin = jax.lax.dynamic_slice(jnp.asarray(sin_t), (pos0, 0), (t, half))
  cos = jax.lax.dynamic_slice(jnp.asarray(cos_t), (pos0, 0), (t, half))
  sin, cos = sin[None, :, None, :], cos[None, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def grouped_attention(q, k, v, pos0, cfg: LMConfig):
  """Causal grouped-query attention: q [B, T, H, D] at positions
  ``pos0 + t`` over keys / values [B, S, KV, D] at positions ``0..S-1``;
  returns [B, T, H * D]. A key at ``s`` is seen by the query at ``p`` when
  ``s <= p``."""
  b, t, h, d = q.shape
  s, kv = k.shape[1], cfg.num_kv_heads
  q = q.reshape(b, t, kv, h // kv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k) * (1.0 / math.sqrt(d))
  qpos = pos0 + jnp.arange(t, dtype=jnp.int32)
  visible = jnp.arange(s, dtype=jnp.int32)[None, :] <= qpos[:, None]
  logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
  return out.reshape(b, t, h * d)


def _block(x, pos0, cache, cfg: LMConfig, p):
  """One decoder block on [B, T, D] ``x``. ``p``: callables ``attn_norm``,
  ``q``, ``k``, ``v``, ``o``, ``mlp_norm``, ``gate``, ``up``, ``down``.
  ``cache``: ``(k, v)`` caches or None (attend to this sequence only).
  Returns ``(x, new_k_cache, new_v_cache)`` (None, None without a cache)."""
  b, t, _ = x.shape
  y = p.attn_norm(x)
  q = apply_rope(p.q(y).reshape(b, t, cfg.num_heads, cfg.head_dim), pos0, cfg)
  k = apply_rope(p.k(y).reshape(b, t, cfg.num_kv_heads, cfg.head_dim), pos0,
                 cfg)
  v = p.v(y).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  new_k = new_v = None
  if cache is not None:
    zero = jnp.zeros((), jnp.int32)
    start = (zero, pos0, zero, zero)
    new_k = jax.lax.dynamic_update_slice(cache[0], k, start)
    new_v = jax.lax.dynamic_update_slice(cache[1], v, start)
    k, v = new_k, new_v
  x = x + p.o(grouped_attention(q, k, v, pos0, cfg))
  y = p.mlp_norm(x)
  y = p.down(jax.nn.gelu(p.gate(y), approximate=True) * p.up(y))
  return x + y, new_k, new_v


@jax.custom_jvp
def _lookup_rows(flat_ids, table):
  return jax.lax.composite(lambda i, w: jnp.take(w, i, axis=0),
                           name="odml.embedding_lookup")(flat_ids, table)


@_lookup_rows.defjvp
def _lookup_rows_jvp(primals, tangents):
  # composite has no differentiation rule: the lookup is linear in the
  # table, so its tangent is the same lookup of the table's tangent.
  flat_ids, table = primals
  return _lookup_rows(flat_ids, table), jnp.take(tangents[1], flat_ids,
                                                 axis=0)


def embedding_lookup(table, ids):
  """``table[ids]`` for int32 ids [B, T] and a [V, D] table, as a
  ``jax.lax.composite`` named ``odml.embedding_lookup`` over the flat ids:
  the converter lowers it to LiteRT's EMBEDDING_LOOKUP, whose table is the
  same buffer as the tied output projection's FULLY_CONNECTED weights (a
  plain ``jnp.take`` becomes a GATHER_ND whose table quantizers leave float,
  one copy per signature). Differentiable (trainable) through a custom JVP.
  """
  b, t = ids.shape
  flat = ids.reshape(b * t).astype(jnp.int32)
  return _lookup_rows(flat, table).reshape(b, t, table.shape[1])


def _forward(embed, final_norm, blocks, ids, pos0, caches,
             cfg: LMConfig):
  """Shared body: returns ``(hidden [B, T, D], new_caches)``."""
  table = embed.embedding
  if isinstance(table, nnx.Variable):
    table = table[...]
  rows = embedding_lookup(table, ids) if cfg.composite_lookup else \
      jnp.take(table, ids, axis=0)
  x = rows * jnp.float32(math.sqrt(cfg.d_model))
  new = []
  for i, blk in enumerate(blocks):
    cache = None if caches is None else (caches[2 * i], caches[2 * i + 1])
    x, k, v = _block(x, pos0, cache, cfg, blk)
    new += [k, v]
  return final_norm(x), (None if caches is None else tuple(new))


def _check_caches(caches, cfg: LMConfig):
  if len(caches) != 2 * cfg.num_layers:
    raise ValueError(f"expected {2 * cfg.num_layers} caches (k, v per "
                     f"layer), got {len(caches)}")


def _last(h, length):
  """Hidden state [B, D] at position ``length - 1`` of [B, T, D] ``h``."""
  idx = jnp.asarray(length, jnp.int32) - 1
  zero = jnp.zeros((), jnp.int32)
  return jax.lax.dynamic_slice(h, (zero, idx, zero),
                               (h.shape[0], 1, h.shape[2]))[:, 0]


class _BlockLinen(nn.Module):
  cfg: LMConfig

  def setup(self):
    c = self.cfg
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)
    self.attn_norm = nn.RMSNorm(name="attn_norm")
    self.q = dense(c.num_heads * c.head_dim, "q")
    self.k = dense(c.num_kv_heads * c.head_dim, "k")
    self.v = dense(c.num_kv_heads * c.head_dim, "v")
    self.o = dense(c.d_model, "o")
    self.mlp_norm = nn.RMSNorm(name="mlp_norm")
    self.gate = dense(c.mlp_dim, "gate")
    self.up = dense(c.mlp_dim, "up")
    self.down = dense(c.d_model, "down")


class GemmaLM(nn.Module):
  """Gemma-style decoder LM (Linen); see the module docstring."""
  cfg: LMConfig = TINY

  def setup(self):
    c = self.cfg
    self.embed = nn.Embed(c.vocab, c.d_model, name="embed",
                          embedding_init=nn.initializers.normal(1.0))
    self.blocks = [_BlockLinen(c, name=f"layer{i}")
                   for i in range(c.num_layers)]
    self.final_norm = nn.RMSNorm(name="final_norm")

  def _run(self, ids, pos0, caches):
    return _forward(self.embed, self.final_norm, self.blocks, ids, pos0,
                    caches, self.cfg)

  def __call__(self, ids):
    h, _ = self._run(ids, jnp.zeros((), jnp.int32), None)
    return self.embed.attend(h)

  def prefill(self, ids, length, *caches):
    _check_caches(caches, self.cfg)
    h, new = self._run(ids, jnp.zeros((), jnp.int32), caches)
    return (self.embed.attend(_last(h, length)),) + new

  def decode(self, ids, pos, *caches):
    _check_caches(caches, self.cfg)
    h, new = self._run(ids, jnp.asarray(pos, jnp.int32), caches)
    return (self.embed.attend(h[:, 0]),) + new


class _BlockNNX(nnx.Module):

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    c = cfg
    lin = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
    self.attn_norm = nnx.RMSNorm(c.d_model, rngs=rngs)
    self.q = lin(c.d_model, c.num_heads * c.head_dim)
    self.k = lin(c.d_model, c.num_kv_heads * c.head_dim)
    self.v = lin(c.d_model, c.num_kv_heads * c.head_dim)
    self.o = lin(c.num_heads * c.head_dim, c.d_model)
    self.mlp_norm = nnx.RMSNorm(c.d_model, rngs=rngs)
    self.gate = lin(c.d_model, c.mlp_dim)
    self.up = lin(c.d_model, c.mlp_dim)
    self.down = lin(c.mlp_dim, c.d_model)


class GemmaLMNNX(nnx.Module):
  """Gemma-style decoder LM (NNX); see the module docstring."""

  def __init__(self, cfg: LMConfig = TINY, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs,
                           embedding_init=nnx.initializers.normal(1.0))
    self.blocks = nnx.List([_BlockNNX(cfg, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.final_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)

  def _run(self, ids, pos0, caches):
    return _forward(self.embed, self.final_norm, self.blocks, ids,
                    pos0, caches, self.cfg)

  def __call__(self, ids):
    h, _ = self._run(ids, jnp.zeros((), jnp.int32), None)
    return self.embed.attend(h)

  def prefill(self, ids, length, *caches):
    _check_caches(caches, self.cfg)
    h, new = self._run(ids, jnp.zeros((), jnp.int32), caches)
    return (self.embed.attend(_last(h, length)),) + new

  def decode(self, ids, pos, *caches):
    _check_caches(caches, self.cfg)
    h, new = self._run(ids, jnp.asarray(pos, jnp.int32), caches)
    return (self.embed.attend(h[:, 0]),) + new


def build_linen(cfg: LMConfig = TINY, seed: int = 0):
  """Returns ``(model, variables)``: a :class:`GemmaLM` with seeded weights."""
  model = GemmaLM(cfg)
  variables = model.init(jax.random.key(seed),
                         jnp.zeros((1, 4), jnp.int32))
  return model, variables


def build_nnx(cfg: LMConfig = TINY, seed: int = 0) -> GemmaLMNNX:
  """Returns a :class:`GemmaLMNNX` with seeded weights."""
  return GemmaLMNNX(cfg, rngs=nnx.Rngs(seed))


def signature_args(cfg: LMConfig, prefill_len: int, batch: int = 1) -> dict:
  """Example args of the two signatures: ``{"prefill": (ids [B, T],
  length, *caches), "decode": (ids [B, 1], pos, *caches)}`` (zeros; only
  shapes and dtypes matter)."""
  caches = cfg.empty_caches(batch)
  return {
      "prefill": (np.zeros((batch, prefill_len), np.int32),
                  np.int32(prefill_len)) + caches,
      "decode": (np.zeros((batch, 1), np.int32), np.int32(0)) + caches,
  }


def signature_io_names(cfg: LMConfig) -> dict:
  """Input / output names of the two signatures (what
  :mod:`qlite.litert.generate` expects)."""
  caches = [f"{kind}_cache_{i}" for i in range(cfg.num_layers)
            for kind in ("k", "v")]
  return {
      "prefill": (["tokens", "length"] + caches, ["logits"] + caches),
      "decode": (["tokens", "pos"] + caches, ["logits"] + caches),
  }


def greedy_reference(full_logits, prompt_ids, max_new_tokens: int):
  """JAX float greedy continuation: ``(tokens, logits [n, V])`` where
  ``full_logits(ids [1, L]) -> [1, L, V]`` is the model's full-sequence
  forward (e.g. ``lambda ids: model.apply(variables, ids)``). Runs one
  jitted forward of static length ``len(prompt) + max_new_tokens`` per
  token (causal: the zero padding after the current position is never
  seen)."""
  prompt = [int(t) for t in prompt_ids]
  total = len(prompt) + max_new_tokens
  fwd = jax.jit(full_logits)
  seq = np.zeros((1, total), np.int32)
  seq[0, :len(prompt)] = prompt
  tokens, rows = [], []
  for i in range(max_new_tokens):
    pos = len(prompt) + i - 1
    row = np.asarray(fwd(seq)[0, pos], np.float32)
    tok = int(np.argmax(row))
    tokens.append(tok)
    rows.append(row)
    if i + 1 < max_new_tokens:
      seq[0, pos + 1] = tok
  return tokens, np.stack(rows)


class DecodeStep(nn.Module):
  """:meth:`GemmaLM.decode` as ``__call__`` (Linen), for qlite's
  full-integer export, which calibrates and exports a module's
  ``__call__``: ``(ids [B, 1], pos, *caches) -> (logits, *caches)``. Its
  variables are the LM's under ``"lm"`` (:func:`step_variables`)."""
  cfg: LMConfig = TINY

  @nn.compact
  def __call__(self, ids, pos, *caches):
    return GemmaLM(self.cfg, name="lm").decode(ids, pos, *caches)


def step_variables(variables) -> dict:
  """The variables of a :class:`DecodeStep` from :class:`GemmaLM`'s."""
  return {"params": {"lm": variables["params"]}}
