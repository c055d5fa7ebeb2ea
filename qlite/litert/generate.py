"""Token generation with a multi-signature LM ``.tflite`` (``prefill`` +
``decode`` with an explicit KV cache) in LiteRT.

The model contract (what :mod:`qlite.zoo.gemma_lm` exports):

- ``prefill(tokens [1, T] int32, length int32, *caches) -> (logits [1, V],
  *caches)``: the prompt padded to the static length ``T``; logits at
  position ``length - 1``.
- ``decode(tokens [1, 1] int32, pos int32, *caches) -> (logits [1, V],
  *caches)``: one token at position ``pos``.

Caches go in and come out in the same order (one buffer per layer and
kind); their second axis is the cache length (prompt + new tokens).
A prompt longer than ``T`` is prefilled in its first ``T`` tokens and fed
through ``decode`` for the rest.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from qlite.errors import QliteError


@dataclasses.dataclass
class Generation:
  """What :meth:`LMRunner.generate` returns.

  Attributes:
    tokens: the new token ids (prompt excluded).
    logits: ``[len(tokens), V]`` float32, the logits each new token was
      chosen from.
  """
  tokens: list
  logits: np.ndarray


class LMRunner:
  """Runs a prefill + decode ``.tflite`` LM with one LiteRT interpreter
  (the two signatures share its weights).

  Args:
    model: the ``.tflite`` bytes (or a path).
    num_threads: interpreter threads (None: LiteRT's default).
    prefill, decode: the signature names.

  Attributes:
    prefill_len: the static prompt length ``T`` of ``prefill``.
    max_len: the cache length (prompt + generated tokens at most).
    vocab: the logits' size.

  Raises:
    QliteError: LiteRT cannot load the model, or it lacks either signature
      or does not follow the contract above.
  """

  def __init__(self, model, *, num_threads: int | None = None,
               prefill: str = "prefill", decode: str = "decode"):
    import os
    import warnings
    from ai_edge_litert.interpreter import Interpreter
    from qlite.litert.runtime import _subgraph_io
    import mmap
    source = {}
    if isinstance(model, (str, os.PathLike)):
      # A file is memory-mapped by LiteRT (as on a phone): its weights are
      # not copied into this process's heap.
      try:
        with open(model, "rb") as f:
          model_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
      except OSError as e:
        raise QliteError(f"cannot read {model!r}: {e}") from None
      source = {"model_path": os.fspath(model)}
      model = model_map
    else:
      model = bytes(model)
      source = {"model_content": model}
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      try:
        self.interpreter = Interpreter(num_threads=num_threads, **source)
      except (RuntimeError, ValueError) as e:
        raise QliteError(f"LiteRT cannot load the model: {e}") from None
    sigs = self.interpreter.get_signature_list()
    for name in (prefill, decode):
      if name not in sigs:
        raise QliteError(f"the .tflite model has no signature {name!r} "
                         f"(it has: {', '.join(sigs) or 'none'}); export it "
                         f"with qlite.export_tflite(model, signatures="
                         f"{{'prefill': ..., 'decode': ...}})")
    self._io = {}
    for name in (prefill, decode):
      runner = self.interpreter.get_signature_runner(name)
      ins, outs = _subgraph_io(model, int(getattr(runner, "_subgraph_index",
                                                  0)))
      di, do = runner.get_input_details(), runner.get_output_details()
      in_names = sorted(di, key=lambda n: ins.get(int(di[n]["index"]), 1e9))
      out_names = sorted(do, key=lambda n: outs.get(int(do[n]["index"]),
                                                    1e9))
      if len(in_names) < 3 or len(out_names) != len(in_names) - 1:
        raise QliteError(f"signature {name!r} does not look like an LM "
                         f"step: inputs {in_names}, outputs {out_names} "
                         f"(expected (tokens, position, *caches) -> "
                         f"(logits, *caches))")
      self._io[name] = (runner, in_names, out_names, di, do)
    if isinstance(model, mmap.mmap):
      model.close()
    del model
    self._prefill, self._decode = prefill, decode
    _, p_in, p_out, p_det, p_odet = self._io[prefill]
    self.prefill_len = int(p_det[p_in[0]]["shape"][1])
    cache0 = p_det[p_in[2]]
    self.max_len = int(cache0["shape"][1])
    self._cache_specs = [(tuple(int(x) for x in p_det[n]["shape"]),
                          np.dtype(p_det[n]["dtype"])) for n in p_in[2:]]
    self.vocab = int(p_odet[p_out[0]]["shape"][-1])

  def empty_caches(self) -> list[np.ndarray]:
    """Zero caches of the model's shapes and dtypes."""
    return [np.zeros(s, d) for s, d in self._cache_specs]

  def step(self, signature: str, tokens: np.ndarray, position: int,
           caches: Sequence[np.ndarray]):
    """Runs one signature; returns ``(logits [V] float32, caches)``."""
    runner, in_names, out_names = self._io[signature][:3]
    feed = {in_names[0]: np.asarray(tokens, np.int32),
            in_names[1]: np.asarray(position, np.int32)}
    feed.update(zip(in_names[2:], caches))
    out = runner(**feed)
    logits = np.asarray(out[out_names[0]], np.float32).reshape(-1)
    return logits, [out[n] for n in out_names[1:]]

  def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *,
               temperature: float = 0.0, top_k: int | None = None,
               seed: int = 0, eos_id: int | None = None) -> Generation:
    """Generates up to ``max_new_tokens`` tokens after ``prompt_ids``.

    Args:
      prompt_ids: the prompt's token ids (at least one).
      max_new_tokens: how many tokens to generate (stops early at
        ``eos_id``).
      temperature: 0 picks the argmax (greedy); above 0 samples from
        ``softmax(logits / temperature)``.
      top_k: with sampling, keep only the ``top_k`` largest logits.
      seed: the sampling seed (same seed, same tokens).
      eos_id: stop after generating this id.

    Returns:
      A :class:`Generation` (new tokens and their logits).

    Raises:
      QliteError: an empty prompt, ids outside the vocabulary, a negative
        temperature or top_k < 1, or prompt + new tokens longer than the
        cache.
    """
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
      raise QliteError("generate needs at least one prompt token")
    if temperature < 0 or (top_k is not None and top_k < 1):
      raise QliteError(f"temperature must be >= 0 and top_k >= 1, got "
                       f"{temperature}, {top_k}")
    if len(prompt) + max_new_tokens > self.max_len:
      raise QliteError(f"prompt ({len(prompt)}) + max_new_tokens "
                       f"({max_new_tokens}) exceeds the model's cache length "
                       f"{self.max_len}; export with a longer cache")
    self._check_ids(prompt)
    rng = np.random.default_rng(seed)
    n0 = min(len(prompt), self.prefill_len)
    padded = np.zeros((1, self.prefill_len), np.int32)
    padded[0, :n0] = prompt[:n0]
    logits, caches = self.step(self._prefill, padded, n0, self.empty_caches())
    for pos in range(n0, len(prompt)):
      logits, caches = self.step(self._decode, [[prompt[pos]]], pos, caches)
    tokens, all_logits = [], []
    pos = len(prompt)
    for i in range(max_new_tokens):
      tok = pick(logits, temperature=temperature, top_k=top_k, rng=rng)
      tokens.append(tok)
      all_logits.append(logits)
      if tok == eos_id or i == max_new_tokens - 1:
        break
      logits, caches = self.step(self._decode, [[tok]], pos, caches)
      pos += 1
    return Generation(tokens, np.stack(all_logits) if all_logits
                      else np.zeros((0, logits.size), np.float32))

  def logits_for(self, prompt_ids: Sequence[int],
                 continuation: Sequence[int]) -> np.ndarray:
    """Teacher-forced logits: row ``i`` of the ``[len(continuation), V]``
    result is the model's prediction for ``continuation[i]`` given the
    prompt and ``continuation[:i]`` (to compare a format's next-token
    choices with a reference continuation, position by position).

    Raises:
      QliteError: as :meth:`generate`.
    """
    prompt = [int(t) for t in prompt_ids]
    cont = [int(t) for t in continuation]
    if not prompt:
      raise QliteError("logits_for needs at least one prompt token")
    if len(prompt) + len(cont) > self.max_len:
      raise QliteError(f"prompt ({len(prompt)}) + continuation "
                       f"({len(cont)}) exceeds the model's cache length "
                       f"{self.max_len}")
    self._check_ids(prompt + cont)
    n0 = min(len(prompt), self.prefill_len)
    padded = np.zeros((1, self.prefill_len), np.int32)
    padded[0, :n0] = prompt[:n0]
    logits, caches = self.step(self._prefill, padded, n0, self.empty_caches())
    seq = prompt + cont
    rows = []
    for pos in range(n0, len(seq)):
      if pos >= len(prompt):
        rows.append(logits)
      if pos == len(seq) - 1:
        break
      logits, caches = self.step(self._decode, [[seq[pos]]], pos, caches)
    return np.stack(rows) if rows else np.zeros((0, logits.size), np.float32)

  def _check_ids(self, ids):
    bad = [t for t in ids if not 0 <= t < self.vocab]
    if bad:
      raise QliteError(f"token ids {bad[:5]} are outside the vocabulary "
                       f"[0, {self.vocab})")


def pick(logits: np.ndarray, *, temperature: float = 0.0,
         top_k: int | None = None, rng=None) -> int:
  """Chooses the next token from ``logits`` [V]: the argmax when
  ``temperature`` is 0, else a sample of ``softmax(logits / temperature)``
  over the ``top_k`` largest logits (all when None)."""
  logits = np.asarray(logits, np.float64).reshape(-1)
  if temperature == 0:
    return int(np.argmax(logits))
  z = logits / temperature
  if top_k is not None and top_k < z.size:
    cut = np.partition(z, -top_k)[-top_k]
    z = np.where(z >= cut, z, -np.inf)
  p = np.exp(z - z.max())
  p /= p.sum()
  rng = rng if rng is not None else np.random.default_rng(0)
  return int(rng.choice(z.size, p=p))


def generate(model, prompt_ids: Sequence[int], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None,
             seed: int = 0, num_threads: int | None = None) -> list[int]:
  """Generates with a prefill + decode ``.tflite`` (bytes or path); returns
  the new token ids (:meth:`LMRunner.generate`).

  Example:
    >>> tokens = generate("lm.tflite", [1, 2, 3], 8)              # greedy
    >>> tokens = generate("lm.tflite", [1, 2, 3], 8, temperature=0.8,
    ...                   top_k=40, seed=1)
  """
  runner = LMRunner(model, num_threads=num_threads)
  return runner.generate(prompt_ids, max_new_tokens, temperature=temperature,
                         top_k=top_k, seed=seed).tokens
