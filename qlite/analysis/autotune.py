"""Automatic mixed precision: promote the fewest modules to int16 (LiteRT
16x8) or, when allowed, float, until the exported model reaches a target
SQNR against the float model on held-out batches.

The modules are ranked once by sensitivity: the SQNR of the model's
outputs when only that module's activations are quantized (fake-quant JAX,
weights float: the noise the module adds, as it reaches the outputs), as
noise power per boundary the module has (the size / latency cost), ties
broken by the per-boundary ``own_vs_float`` that :func:`qlite.compare`
measures (the noise a boundary's own scale adds, upstream aside; measured
alone it ranked a transformer's modules poorly: 27 of 30 modules to gain 6
dB). The search then exports the model with the k most sensitive modules
promoted, for k found by doubling then bisection, and measures each export
in LiteRT on the held-out batches.
"""

from __future__ import annotations

import dataclasses
import re
import time
import warnings
from typing import Any, Sequence

import jax
import numpy as np

from qlite.analysis.runner import compare
from qlite.errors import QliteError
from qlite.litert.pipeline import calibrate, export_tflite
from qlite.litert.rule_check import NO_16X8_KERNEL
from qlite.litert.runtime import TFLiteRunner
from qlite.metrics import sqnr_db
from qlite.rules import QuantizationRule

__all__ = ["AutotuneReport", "autotune"]

FLOAT = "float"


@dataclasses.dataclass
class Step:
  """One export the search measured."""
  promoted: int            # modules promoted
  sqnr_db: float           # LiteRT vs float on the held-out batches
  error: str | None = None


@dataclasses.dataclass
class AutotuneReport:
  """What :func:`autotune` found and what it costs.

  Attributes:
    target_sqnr_db: the target.
    reached: True when the returned rules reach it.
    base_sqnr_db / final_sqnr_db: LiteRT vs float on the held-out batches,
      with the given rules and with the returned ones (min over outputs).
    promoted: ``[(module_path, qtype, alone_sqnr_db, own_sqnr_db)]`` in
      sensitivity order (``qtype``: ``"int16"`` or ``"float"``):
      ``alone``: SQNR of the outputs with only that module's activations
      int8 (what ranks it), ``own``: compare's ``own_vs_float``, the lowest
      of its boundaries.
    boundaries: activation boundaries of the model; ``boundaries_promoted``
      of them are in promoted modules.
    base_size / final_size: ``.tflite`` bytes.
    base_latency_ms / final_latency_ms: LiteRT median latency of one
      example (``latency_threads`` threads).
    steps: every export measured, in search order.
    skipped: modules a candidate could not be applied to (named error).
  """
  target_sqnr_db: float
  reached: bool
  base_sqnr_db: float
  final_sqnr_db: float
  promoted: list[tuple[str, str, float, float]]
  boundaries: int
  boundaries_promoted: int
  base_size: int
  final_size: int
  base_latency_ms: float
  final_latency_ms: float
  latency_threads: int
  steps: list[Step]
  skipped: list[tuple[str, str]]

  @property
  def fraction_promoted(self) -> float:
    """``boundaries_promoted / boundaries``."""
    return self.boundaries_promoted / max(self.boundaries, 1)

  def __str__(self) -> str:
    lines = [
        f"qlite autotune: target {self.target_sqnr_db:.1f} dB "
        f"{'reached' if self.reached else 'NOT reached'}: "
        f"{self.base_sqnr_db:.1f} -> {self.final_sqnr_db:.1f} dB (LiteRT vs "
        f"float, held-out batches)",
        f"  promoted {len(self.promoted)} modules = "
        f"{self.boundaries_promoted}/{self.boundaries} boundaries "
        f"({100 * self.fraction_promoted:.1f} %)",
        f"  size {self.base_size} -> {self.final_size} bytes "
        f"({_pct(self.final_size, self.base_size)}); LiteRT latency "
        f"{self.base_latency_ms:.3f} -> {self.final_latency_ms:.3f} ms "
        f"({_pct(self.final_latency_ms, self.base_latency_ms)}, "
        f"{self.latency_threads} thread(s), median)"]
    for path, qtype, alone, own in self.promoted:
      lines.append(f"    {qtype:<6} {path or '<root>'}  (alone "
                   f"{alone:.1f} dB, own {own:.1f} dB)")
    lines.append("  search: " + ", ".join(
        f"{s.promoted}->" + (f"{s.sqnr_db:.1f} dB" if s.error is None
                             else "error") for s in self.steps))
    for path, why in self.skipped:
      lines.append(f"  skipped {path}: {why}")
    return "\n".join(lines)


def _pct(a: float, b: float) -> str:
  return f"{100.0 * (a / b - 1.0):+.1f} %" if b else "n/a"


def _as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _rows(batches) -> list[tuple]:
  """Every row of ``batches`` as batch-1 positional args."""
  out = []
  for batch in batches:
    args = tuple(np.asarray(a) for a in _as_args(batch))
    for i in range(args[0].shape[0]):
      out.append(tuple(a[i:i + 1] for a in args))
  return out


class _Evaluator:
  """Float reference outputs of the held-out rows, and LiteRT SQNR /
  latency of an export against them."""

  def __init__(self, model, variables, rows, latency_threads: int):
    self.rows = rows
    self.threads = latency_threads
    if variables is not None:
      fn = jax.jit(lambda *a: model.apply(variables, *a))
    else:
      fn = jax.jit(lambda *a: model(*a))
    refs = [[np.asarray(o) for o in jax.tree_util.tree_leaves(fn(*r))]
            for r in rows]
    self.refs = [np.concatenate([r[k] for r in refs])
                 for k in range(len(refs[0]))]

  def sqnr(self, blob: bytes) -> float:
    runner = TFLiteRunner(blob)
    outs = [runner.run(*r) for r in self.rows]
    ys = [np.concatenate([np.asarray(o[k]) for o in outs])
          for k in range(len(self.refs))]
    return float(min(sqnr_db(ref, y) for ref, y in zip(self.refs, ys)))

  def latency_ms(self, blob: bytes, runs: int = 50) -> float:
    runner = TFLiteRunner(blob, num_threads=self.threads)
    row = self.rows[0]
    for _ in range(5):
      runner.run(*row)
    times = []
    for _ in range(runs):
      t0 = time.perf_counter()
      runner.run(*row)
      times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _alone_sqnr(model, variables, rules, stats, batch) -> dict[str, float]:
  """``{module_path: SQNR dB}`` of the model's outputs against float when
  only that module's activation boundaries (and the constants its ops
  read) are quantized, weights float: how much of the end-to-end error
  each module's activations cause, as it reaches the outputs (noise powers
  of separate modules roughly add up). One fake-quant JAX run per module."""
  from qlite.litert.providers import ConversionProvider
  from qlite.quant.provider import QuantizedModel
  provider = ConversionProvider(rules, stats)
  qm = QuantizedModel(model, provider, variables)
  args = _as_args(batch)
  graph, plan = qm.traced(args)
  params = variables if variables is not None else qm.mf.params
  flat_params = jax.tree_util.tree_leaves(params)
  flat_args = jax.tree_util.tree_leaves(args)
  fn = (lambda *a: model.apply(variables, *a)) if variables is not None \
      else model
  refs = [np.asarray(o, np.float64)
          for o in jax.tree_util.tree_leaves(fn(*args))]
  paths = sorted({b.module_path for b in plan.boundaries.values()
                  if b.op != "input"})
  out = {}
  for path in paths:
    sub = dataclasses.replace(
        plan,
        boundaries={v: b for v, b in plan.boundaries.items()
                    if b.module_path == path and b.op != "input"},
        weights={},
        consts={k: c for k, c in plan.consts.items()
                if graph.nodes[c.node].module_path == path})
    ys = jax.jit(provider.function(graph, sub, flat_params))(*flat_args)
    out[path] = float(min(sqnr_db(r, np.asarray(y))
                          for r, y in zip(refs, jax.tree_util.tree_leaves(
                              ys))))
  return out


def _module_rule(path: str, qtype: str, base_qtype: str | None,
                 ops: set[str]) -> list[QuantizationRule]:
  """The rules that promote module ``path`` (exactly) to ``qtype``; for
  int16, its ``ops`` without a 16x8 kernel stay at the base qtype."""
  exact = re.escape(path)
  if qtype == FLOAT:
    return [QuantizationRule(module_path=exact, act_qtype=None,
                             weight_qtype=None)]
  keep = base_qtype if base_qtype is not None else "int8"
  no16 = tuple(sorted(op for op in ops if op in NO_16X8_KERNEL))
  head = [QuantizationRule(module_path=exact, op_names=no16,
                           act_qtype=keep)] if no16 else []
  return head + [QuantizationRule(module_path=exact, act_qtype=qtype)]


def _base_qtype(rules: Sequence[QuantizationRule]) -> str | None:
  acts = [r.act_qtype for r in rules if r.act_qtype is not None]
  return acts[-1] if acts else None


def autotune(model, rules: Sequence[QuantizationRule], batches, *,
             variables=None, target_sqnr_db: float,
             eval_batches=None, candidates: Sequence[str] = ("int16",),
             allow_float: bool = False, max_fraction: float | None = None,
             method: str = "minmax", latency_threads: int = 1,
             progress: bool = False
             ) -> tuple[list[QuantizationRule], Any, AutotuneReport]:
  """Promotes the fewest modules to int16 (or float) until the LiteRT
  model reaches ``target_sqnr_db`` against the float model on held-out
  batches.

  Example usage::

    >>> rules, stats, report = qlite.autotune(
    ...     model, [qlite.QuantizationRule()], batches, variables=variables,
    ...     target_sqnr_db=35.0)
    >>> print(report)
    >>> blob = qlite.export_tflite(model, rules, stats, batches[0][:1],
    ...                            variables=variables)

  Args:
    model: a Linen module (with ``variables``) or an NNX module.
    rules: the starting rules (e.g. all int8); promotions go before them.
    batches: calibration batches (arrays, or tuples of positional arrays).
    variables: the Linen variables.
    target_sqnr_db: the LiteRT vs float SQNR (dB, min over the model's
      outputs) to reach on ``eval_batches``.
    eval_batches: held-out batches; default: the last quarter of
      ``batches`` (at least one), which calibration then does not see.
    candidates: what a module may be promoted to, cheapest first:
      ``"int16"`` (LiteRT 16x8) and / or ``"float"``.
    allow_float: allow ``"float"`` (a float island: the returned rules
      need ``export_tflite(..., strict=False)``); with int16 candidates,
      float is tried only once every module is int16 and the target is
      still missed.
    max_fraction: stop before promoting more than this fraction of the
      boundaries (None: no limit).
    method: the calibration range method.
    latency_threads: LiteRT threads for the latency figures.
    progress: print each export measured.

  Returns:
    ``(rules, stats, report)``: the promoted rules followed by ``rules``,
    the calibration stats (valid for both), and an :class:`AutotuneReport`
    (promoted modules, SQNR, size and LiteRT latency cost). When the target
    cannot be reached the rules of the best export are returned and
    ``report.reached`` is False.

  Raises:
    QliteError: no batches, a target that is not a number, an unknown
      candidate, ``"float"`` without ``allow_float``, or an export with the
      starting rules that fails (its own named error).
  """
  rules = list(rules)
  batches = list(batches)
  if not batches:
    raise QliteError("autotune needs calibration batches")
  if not isinstance(target_sqnr_db, (int, float)) or \
      not np.isfinite(target_sqnr_db):
    raise QliteError(f"target_sqnr_db must be a finite number of dB, got "
                     f"{target_sqnr_db!r}")
  candidates = tuple(candidates)
  for c in candidates:
    if c not in ("int16", FLOAT):
      raise QliteError(f"autotune candidates are 'int16' and 'float', got "
                       f"{c!r}")
  if FLOAT in candidates and not allow_float:
    raise QliteError("candidates include 'float' but allow_float=False: "
                     "pass allow_float=True to accept float islands")
  if allow_float and FLOAT not in candidates:
    candidates = candidates + (FLOAT,)
  if eval_batches is None:
    if len(batches) < 2:
      raise QliteError("autotune holds out the last quarter of batches for "
                       "evaluation: pass at least 2 batches, or "
                       "eval_batches")
    n = max(1, len(batches) // 4)
    batches, eval_batches = batches[:-n], batches[-n:]
  eval_rows = _rows(list(eval_batches))
  example = _rows(batches[:1])[0]
  ev = _Evaluator(model, variables, eval_rows, latency_threads)
  say = print if progress else (lambda *a, **k: None)

  stats = calibrate(model, rules, batches, variables=variables,
                    method=method, progress=False)

  def export(rs, strict=True) -> bytes:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return export_tflite(model, rs, stats, example, variables=variables,
                           strict=strict)

  base_blob = export(rules)
  base_sqnr = ev.sqnr(base_blob)
  say(f"autotune: base {base_sqnr:.1f} dB")
  report = compare(model, rules, stats, base_blob, eval_batches[:1],
                   variables=variables, progress=False)
  # module paths exactly (the root module: ""; model inputs take the rule
  # of the op that reads them, so they are no candidates of their own)
  layers = [r for r in report.layers if r.op != "input"]
  counts: dict[str, int] = {}
  own: dict[str, float] = {}
  module_ops: dict[str, set[str]] = {}
  for r in layers:
    counts[r.module_path] = counts.get(r.module_path, 0) + 1
    module_ops.setdefault(r.module_path, set()).add(r.op)
    s = r.sqnr("own_vs_float")
    if s is not None:
      own[r.module_path] = min(own.get(r.module_path, np.inf), s)
  alone = _alone_sqnr(model, variables, rules, stats, eval_batches[0])
  # most noise removed per boundary promoted first: the output noise power
  # with only that module's activations quantized (10^(-alone/10)) over its
  # boundaries (what int16 costs in size and latency); compare's own SQNR
  # breaks ties
  ranked = sorted((p for p in counts if p in alone),
                  key=lambda p: (-10.0 ** (-alone[p] / 10.0) / counts[p],
                                 own.get(p, np.inf)))
  total = len(report.layers)
  base_qtype = _base_qtype(rules)

  steps: list[Step] = []
  skipped: list[tuple[str, str]] = []
  cache: dict[tuple, tuple[float, bytes | None]] = {}

  def rules_for(promo: list[tuple[str, str]]) -> list[QuantizationRule]:
    out: list[QuantizationRule] = []
    for path, qtype in promo:
      out += _module_rule(path, qtype, base_qtype, module_ops[path])
    return out + rules

  def measure(promo: list[tuple[str, str]]) -> tuple[float, bytes | None]:
    key = tuple(promo)
    if key not in cache:
      strict = all(q != FLOAT for _, q in promo)
      try:
        blob = export(rules_for(promo), strict=strict)
        cache[key] = (ev.sqnr(blob), blob)
        steps.append(Step(len(promo), cache[key][0]))
      except QliteError as e:       # a named refusal: skip that module
        cache[key] = (-np.inf, None)
        steps.append(Step(len(promo), -np.inf, str(e).split("\n")[0]))
      say(f"autotune: {len(promo)} promoted -> {cache[key][0]:.1f} dB")
    return cache[key]

  def fraction(promo) -> float:
    return sum(counts[p] for p, _ in promo) / max(total, 1)

  # int16 (the first candidate) for the k most sensitive modules that take
  # it: modules whose promotion alone fails (a gather reading them...) are
  # skipped.
  first = candidates[0]
  usable = list(ranked)
  best = ([], base_sqnr, base_blob)

  def promo_of(k, qtype=first):
    return [(p, qtype) for p in usable[:k]]

  def try_k(k):
    nonlocal best
    promo = promo_of(k)
    while True:
      if max_fraction is not None and fraction(promo) > max_fraction:
        return None
      s, blob = measure(promo)
      if blob is not None:
        break
      # the last promoted module cannot take the candidate: drop it
      bad = promo[-1][0]
      skipped.append((bad, steps[-1].error or "export failed"))
      usable.remove(bad)
      promo = promo_of(k)
      if len(promo) < k:
        return None
    if s > best[1] or (s >= target_sqnr_db and len(promo) < len(best[0])):
      best = (promo, s, blob)
    return s

  if base_sqnr < target_sqnr_db and usable:
    lo, hi, k = 0, None, 1
    while usable:                       # doubling...
      k = min(k, len(usable))
      s = try_k(k)
      if s is None:
        break
      if s >= target_sqnr_db:
        hi = k
        break
      lo = k
      if k >= len(usable):
        break
      k *= 2
    if hi is not None:                  # ...then bisection
      while hi - lo > 1:
        mid = (lo + hi) // 2
        s = try_k(mid)
        if s is not None and s >= target_sqnr_db:
          hi = mid
        else:
          lo = mid
      promo = promo_of(hi)
      s, blob = measure(promo)
      if blob is not None:
        best = (promo, s, blob)
  # float for the most sensitive modules when int16 everywhere misses it
  if best[1] < target_sqnr_db and FLOAT in candidates and first != FLOAT:
    promo = list(best[0])
    for path in ranked:
      if best[1] >= target_sqnr_db:
        break
      trial = [(p, q) for p, q in promo if p != path] + [(path, FLOAT)]
      if max_fraction is not None and fraction(trial) > max_fraction:
        break
      s, blob = measure(trial)
      if blob is not None and s > best[1]:
        promo = trial
        best = (trial, s, blob)

  promo, final_sqnr, final_blob = best
  final_rules = rules_for(promo)
  out = AutotuneReport(
      target_sqnr_db=float(target_sqnr_db),
      reached=bool(final_sqnr >= target_sqnr_db),
      base_sqnr_db=base_sqnr, final_sqnr_db=float(final_sqnr),
      promoted=[(p, q, float(alone[p]), float(own.get(p, np.nan)))
                for p, q in promo],
      boundaries=total,
      boundaries_promoted=sum(counts[p] for p, _ in promo),
      base_size=len(base_blob), final_size=len(final_blob),
      base_latency_ms=ev.latency_ms(base_blob),
      final_latency_ms=ev.latency_ms(final_blob),
      latency_threads=latency_threads, steps=steps, skipped=skipped)
  return final_rules, stats, out
