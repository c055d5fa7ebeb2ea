"""Automatic mixed precision: promote the fewest activation boundaries to
int16 (LiteRT 16x8) or, when allowed, float, until the exported model
reaches a target SQNR against the float model on held-out batches.

The unit of promotion is an op group: the ops of one jax primitive in one
Flax module (a rule with the exact ``module_path`` and ``op_names=(op,)``),
so a module's LayerNorm ``mul`` s can go int16 without its ``sub`` s. A
value's int8 noise only goes away when the op that produces it *and* every
op that reads it run at int16 (an int8 reader requantizes it back to int8),
so besides single groups the search tries each value's producer + readers
together, each module and each module subtree.

The search scores candidate sets in JAX, not by exporting: one jitted
fake-quant model of the starting plan whose every activation boundary,
requantize edge, constant and weight takes its qtype from a code vector
(:class:`_MixModel`), so scoring a set is building its plan and one run.
Greedy forward selection adds the move that removes the most output noise
per boundary promoted until the fake-quant SQNR reaches the target, then a
pruning pass drops groups the target does not need. The LiteRT export is
the judge: a set whose ``.tflite`` misses the target raises the fake-quant
goal by the measured gap and the search continues; a set whose export
fails with a named error drops the module the error names.
"""

from __future__ import annotations

import dataclasses
import re
import time
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qlite import ops
from qlite.core import numerics
from qlite.errors import QliteError
from qlite.litert import fake_quant as fq
from qlite.litert.pipeline import calibrate, export_tflite
from qlite.litert.providers import (ConversionProvider, _check_16x8_kernels,
                                    _int8_lookup_tables,
                                    _requantized_operands)
from qlite.litert.rule_check import NO_16X8_KERNEL
from qlite.litert.runtime import TFLiteRunner
from qlite.metrics import sqnr_db, sqnr_db_from_power
from qlite.quant import plan as plan_lib
from qlite.quant.plan import build_plan, quantize_operands
from qlite.quant.provider import QuantizedModel
from qlite.quant.scales import boundary_scale, symmetric_acts
from qlite.rules import QuantizationRule, RuleMatcher
from qlite.trace import graph as graph_lib

__all__ = ["AutotuneReport", "autotune"]

FLOAT = "float"
INT16 = "int16"

Group = tuple[str, str]          # (module_path, jax primitive)


@dataclasses.dataclass
class Step:
  """One export the search measured."""
  promoted: int            # boundaries promoted
  sqnr_db: float           # LiteRT vs float on the held-out batches
  error: str | None = None
  predicted_db: float | None = None   # the fake-quant JAX model's SQNR


@dataclasses.dataclass
class AutotuneReport:
  """What :func:`autotune` found and what it costs.

  Attributes:
    target_sqnr_db: the target.
    reached: True when the returned rules reach it.
    base_sqnr_db / final_sqnr_db: LiteRT vs float on the held-out batches,
      with the given rules and with the returned ones (min over outputs).
    promoted: ``[(module_path, op, qtype, gain_db)]`` in search order: the
      op groups promoted (``op`` a jax primitive, ``qtype`` ``"int16"`` or
      ``"float"``), ``gain_db`` the fake-quant SQNR gain of the search step
      that promoted it.
    boundaries: activation boundaries of the model (with the starting
      rules; model inputs included); ``boundaries_promoted`` of them run at
      another qtype with the returned rules (an op without a 16x8 kernel
      that stays int8 is not counted).
    base_size / final_size: ``.tflite`` bytes.
    base_latency_ms / final_latency_ms: LiteRT median latency of one
      example (``latency_threads`` threads).
    steps: every export measured, in search order.
    skipped: op groups dropped from the search after an export failed with
      a named error that pointed at their module, with that error.
    predicted_sqnr_db: the fake-quant JAX SQNR of the returned rules (what
      the search scored), None when nothing was promoted.
  """
  target_sqnr_db: float
  reached: bool
  base_sqnr_db: float
  final_sqnr_db: float
  promoted: list[tuple[str, str, str, float]]
  boundaries: int
  boundaries_promoted: int
  base_size: int
  final_size: int
  base_latency_ms: float
  final_latency_ms: float
  latency_threads: int
  steps: list[Step]
  skipped: list[tuple[str, str]]
  predicted_sqnr_db: float | None = None

  @property
  def fraction_promoted(self) -> float:
    """``boundaries_promoted / boundaries``."""
    return self.boundaries_promoted / max(self.boundaries, 1)

  @property
  def modules(self) -> list[str]:
    """The module paths with a promoted group, in search order."""
    return list(dict.fromkeys(p for p, *_ in self.promoted))

  def __str__(self) -> str:
    lines = [
        f"qlite autotune: target {self.target_sqnr_db:.1f} dB "
        f"{'reached' if self.reached else 'NOT reached'}: "
        f"{self.base_sqnr_db:.1f} -> {self.final_sqnr_db:.1f} dB (LiteRT vs "
        f"float, held-out batches)",
        f"  promoted {self.boundaries_promoted}/{self.boundaries} boundaries "
        f"({100 * self.fraction_promoted:.1f} %): {len(self.promoted)} op "
        f"groups in {len(self.modules)} modules",
        f"  size {self.base_size} -> {self.final_size} bytes "
        f"({_pct(self.final_size, self.base_size)}); LiteRT latency "
        f"{self.base_latency_ms:.3f} -> {self.final_latency_ms:.3f} ms "
        f"({_pct(self.final_latency_ms, self.base_latency_ms)}, "
        f"{self.latency_threads} thread(s), median)"]
    for path, op, qtype, gain in self.promoted:
      lines.append(f"    {qtype:<6} {path or '<root>'} : {op}  "
                   f"({gain:+.2f} dB fake-quant)")
    lines.append("  exports: " + ", ".join(
        f"{s.promoted} boundaries->" +
        (f"{s.sqnr_db:.1f} dB" if s.error is None else "error") +
        (f" (fake-quant {s.predicted_db:.1f})" if s.predicted_db is not None
         else "") for s in self.steps))
    for group, why in self.skipped:
      lines.append(f"  skipped {group}: {why}")
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


class _MixModel:
  """The fake-quant JAX model of the starting plan (the ``.tflite``'s
  numerics) with every qtype choice an input: ``codes`` per activation
  boundary (0 float, 1 its starting qtype, 2 int16), per requantized
  operand (0 none, 1 to its starting qtype at its own range, 2 at the op's
  output range), per constant (0 float, 1 starting qtype, 2 int16) and per
  weight (0 float, 1 quantized). :meth:`codes` derives them from any rule
  list (its plan: which boundaries are int16, which operands an int8 op
  requantizes...), :meth:`sqnr_db` scores them on the held-out batches:
  one compile, then one run per candidate set.

  It leaves out the int16 rewrites (an int16 GELU's tanh form, a
  broadcasting add as a subtraction: int16-level noise) and the clipping
  of mask fills; the search confirms its choice with LiteRT."""

  def __init__(self, model, variables, rules, stats, batches):
    self.rules = list(rules)
    provider = ConversionProvider(self.rules, stats)
    qm = QuantizedModel(model, provider, variables)
    first = _as_args(batches[0])
    shape = [np.shape(a) for a in first]
    self.batches = [_as_args(b) for b in batches
                    if [np.shape(a) for a in _as_args(b)] == shape]
    graph, plan = qm.traced(first)
    self.graph, self.plan = graph, plan
    params = variables if variables is not None else qm.mf.params
    flat_params = jax.tree_util.tree_leaves(params)
    folded = graph_lib.fold_static(graph, flat_params)
    self.bs = list(plan.boundaries.values())
    self.idx = {b.var: i for i, b in enumerate(self.bs)}

    def scale(b, qt):
      return boundary_scale(dataclasses.replace(
          b, rule=dataclasses.replace(b.rule, act_qtype=qt)), stats)
    low = {b.var: (b.rule.act_qtype, scale(b, b.rule.act_qtype))
           for b in self.bs}
    high = {b.var: scale(b, INT16) for b in self.bs}
    edges = []          # activation operands of quantized compute ops
    for node in graph.nodes:
      if node.index not in plan.quantized_nodes or \
          node.index in plan.fused_nodes or \
          ops.REGISTRY[node.name].role(node) == ops.PASS_THROUGH:
        continue
      for i, a in enumerate(node.inputs):
        if isinstance(a, graph_lib.Lit) or not graph.is_activation(a):
          continue
        src = plan_lib.scale_source(graph, a)
        if src in plan.boundaries:
          out = node.outputs[0] if node.outputs else None
          edges.append((node.index, i, src, out if out in low else src))
    self.eidx = {(n, i): j for j, (n, i, _, _) in enumerate(edges)}
    by_node: dict[int, list] = {}
    for j, (n, i, src, out) in enumerate(edges):
      by_node.setdefault(n, []).append((j, i, src, out))
    self.cidx = {k: j for j, k in enumerate(plan.consts)}
    self.widx = {k: j for j, k in enumerate(plan.weights)}
    live: dict[str, Any] = {}

    # A boundary the int8 plan leaves unrounded (rounding "none": an op whose
    # relu / masked select LiteRT fuses) is rounded after all when that
    # reader is not int8 in the candidate set: LiteRT then requantizes it.
    unrounded_reader = {}
    for b in self.bs:
      if b.rounding == "none":
        cons = graph.consumers.get(b.var, [])
        if len(cons) == 1 and cons[0].outputs and \
            cons[0].outputs[0] in self.idx:
          unrounded_reader[b.var] = self.idx[cons[0].outputs[0]]

    def fq_low(var, val, codes=None):
      qt, (s, z) = low[var]
      rounding = plan.boundaries[var].rounding
      if rounding == "none" and codes is not None and \
          var in unrounded_reader:
        rounded = numerics.fake_quant(val, s[0], z[0], qt)
        return jnp.where(codes[unrounded_reader[var]] == 1,
                         val, rounded)
      return numerics.fake_quant(val, s[0], z[0], qt, rounding=rounding)

    def weight(spec, w):
      s, z = fq.weight_scale(w, spec.rule.weight_qtype, spec.channel_axis,
                             spec.rule.weight_calibration_method)
      q = fq.fake_quant(
          w, s, z, spec.rule.weight_qtype, axis=spec.channel_axis,
          narrow_range=spec.rule.weight_calibration_method == "absmax")
      return jnp.where(live["w"][self.widx[(spec.node, spec.operand)]] == 1,
                       q, w)

    def qconst(c, qt):
      s, z = numerics.scale_zero_point(
          np.float32(np.min(c)), np.float32(np.max(c)), qt,
          symmetric=symmetric_acts(qt), narrow_range=False)
      return numerics.fake_quant(jnp.asarray(c, jnp.float32),
                                 np.reshape(s, -1)[0], np.reshape(z, -1)[0],
                                 qt)

    def const(spec, c):
      if spec.clamp_to is not None or spec.rule.act_qtype is None or \
          not isinstance(c, np.ndarray) or not np.all(np.isfinite(c)):
        return None    # mask fills / traced values: left as they are
      code = live["c"][self.cidx[(spec.node, spec.operand)]]
      return jnp.where(code == 1, qconst(c, spec.rule.act_qtype),
                       jnp.where(code == 2, qconst(c, INT16),
                                 jnp.asarray(c, jnp.float32)))

    def f(codes, ecodes, ccodes, wcodes, *flat_args):
      live.update(c=ccodes, w=wcodes)

      def on_value(var, val):
        i = self.idx.get(var)
        if i is None:
          return val
        s, z = high[var]
        q16 = numerics.fake_quant(val, s[0], z[0], INT16)
        return jnp.where(codes[i] == 1, fq_low(var, val, codes),
                         jnp.where(codes[i] == 2, q16, val))

      def on_node(node, invals):
        invals = list(invals)
        hit = False
        for j, i, src, out in by_node.get(node.index, ()):
          v = invals[i]
          invals[i] = jnp.where(ecodes[j] == 1, fq_low(src, v), jnp.where(
              ecodes[j] == 2, fq_low(out, v), v))
          hit = True
        outs = quantize_operands(plan, node, invals, weight=weight,
                                 const=const)
        if outs is None and hit:
          outs = graph_lib.bind(node, invals)
        return outs
      return graph_lib.evaluate(graph, flat_params, flat_args,
                                on_value=on_value, on_node=on_node,
                                preset=folded)
    self._fn = jax.jit(f)
    self.n_edges = len(edges)
    fn = (lambda *a: model.apply(variables, *a)) if variables is not None \
        else model
    self.refs = [[np.asarray(o, np.float64)
                  for o in jax.tree_util.tree_leaves(fn(*b))]
                 for b in self.batches]
    self.base = self.codes(self.rules)
    self.links = self._links()

  def _links(self) -> dict[Group, frozenset]:
    """Groups that must share a qtype: a scaling fused into the sum
    before it (``sum(x) / n``: one LiteRT MEAN, whose input and output
    types must agree), by group."""
    g, plan = self.graph, self.plan
    parent: dict[Group, Group] = {}

    def find(x):
      while parent.get(x, x) != x:
        x = parent[x]
      return x
    for n in plan.fused_nodes:
      node = g.nodes[n]
      b = plan.boundaries.get(node.outputs[0]) if node.outputs else None
      if b is None or (b.module_path, b.op) != (node.module_path,
                                                node.name):
        continue             # fused into a conv / dot chain: the anchor's
      for a in node.inputs:
        src = g.producer.get(a) if not isinstance(a, graph_lib.Lit) \
            else None
        if src is not None and src.index in plan.quantized_nodes:
          parent[find((src.module_path, src.name))] = find(
              (node.module_path, node.name))
    sets: dict[Group, set] = {}
    for x in list(parent):
      sets.setdefault(find(x), set()).add(x)
    out = {}
    for root, members in sets.items():
      members = frozenset(members | {root})
      for x in members:
        out[x] = members
    return out

  def linked(self, groups) -> set[Group]:
    """``groups`` with the groups linked to them."""
    out = set()
    for x in groups:
      out |= self.links.get(x, {x})
    return out

  def codes(self, rules) -> tuple[np.ndarray, ...]:
    """The code vectors of ``rules`` (their plan over the traced graph).
    Raises QliteError for rules the export refuses (an int16 op without a
    16x8 kernel)."""
    matcher = RuleMatcher(rules)
    plan = build_plan(self.graph, matcher)
    _check_16x8_kernels(self.graph, plan, matcher)
    _int8_lookup_tables(plan)
    codes = np.zeros(len(self.bs), np.int32)
    for var, i in self.idx.items():
      b = plan.boundaries.get(var)
      if b is not None and b.rule.act_qtype is not None:
        codes[i] = 2 if symmetric_acts(b.rule.act_qtype) else 1
    ecodes = np.zeros(self.n_edges, np.int32)
    for n, operands in _requantized_operands(self.graph, plan,
                                             matcher).items():
      for i, qt, target in operands:
        j = self.eidx.get((n, i))
        if j is not None and not symmetric_acts(qt):
          ecodes[j] = 2 if target is not None else 1
    ccodes = np.zeros(len(self.cidx), np.int32)
    for k, j in self.cidx.items():
      spec = plan.consts.get(k)
      if spec is not None and spec.rule.act_qtype is not None:
        ccodes[j] = 2 if symmetric_acts(spec.rule.act_qtype) else 1
    wcodes = np.array([k in plan.weights for k in self.widx], np.int32)
    return codes, ecodes, ccodes, wcodes

  def promoted(self, codes) -> int:
    """Boundaries whose qtype differs from the starting plan's."""
    return int(np.sum(codes[0] != self.base[0]))

  def sqnr_db(self, codes) -> float:
    """Min over outputs of the fake-quant SQNR on the held-out batches."""
    sig = noise = None
    for args, refs in zip(self.batches, self.refs):
      ys = self._fn(*codes, *jax.tree_util.tree_leaves(args))
      ys = [np.asarray(y, np.float64) for y in jax.tree_util.tree_leaves(ys)]
      s = np.array([np.sum(r * r) for r in refs])
      e = np.array([np.sum((r - y) ** 2) for r, y in zip(refs, ys)])
      sig = s if sig is None else sig + s
      noise = e if noise is None else noise + e
    return float(min(sqnr_db_from_power(float(a), float(b))
                     for a, b in zip(sig, noise)))

  def groups_reading(self, b) -> set[Group]:
    """The op groups whose qtype decides the noise of boundary ``b``: its
    producer's and its readers' (through pass-through and fused ops)."""
    g, plan = self.graph, self.plan
    out = set() if b.op == "input" else {(b.module_path, b.op)}
    stack, seen = [b.var], set()
    while stack:
      for node in g.consumers.get(stack.pop(), ()):
        if node.index in seen:
          continue
        seen.add(node.index)
        if node.index in plan.fused_nodes or \
            ops.REGISTRY[node.name].role(node) == ops.PASS_THROUGH:
          stack.extend(o for o in node.outputs if o not in plan.boundaries)
        elif node.index in plan.quantized_nodes:
          out.add((node.module_path, node.name))
    return {x for x in out if x[1] not in NO_16X8_KERNEL}


def _group_rule(group: Group, qtype: str,
                rules: Sequence[QuantizationRule]) -> QuantizationRule:
  """The rule promoting op group ``(module_path, op)`` (exactly) to
  ``qtype``: the starting rule that matched it with another act qtype (its
  weight / calibration options kept), or float activations and weights."""
  path, op = group
  exact = re.escape(path)
  if qtype == FLOAT:       # a float island is a whole module (ops of one
    # module at float and int8 side by side can leave an op no export
    # handles)
    return QuantizationRule(module_path=exact, act_qtype=None,
                            weight_qtype=None)
  m = RuleMatcher(rules).match(path, op)
  if m is None or m[1].act_qtype is None:
    return QuantizationRule(module_path=exact, op_names=(op,),
                            act_qtype=qtype)
  return dataclasses.replace(m[1], module_path=exact, op_names=(op,),
                             act_qtype=qtype)


def _name(g: Group) -> str:
  return f"{g[0] or '<root>'}:{g[1]}"


_MODULE_IN_ERROR = re.compile(r"in module `([^`]*)`")


def _culprit_module(message: str) -> str | None:
  """The module path a named export error points at, or None."""
  m = _MODULE_IN_ERROR.search(message)
  if m is None:
    return None
  return "" if m.group(1) == "<root>" else m.group(1)


@dataclasses.dataclass
class _Score:
  sqnr_db: float
  promoted: int

  @property
  def noise(self) -> float:
    return 10.0 ** (-self.sqnr_db / 10.0)


class _Search:
  """Greedy forward selection of op groups on the fake-quant model."""

  # a full pass over the moves slower than this: later steps rescore the
  # best moves of the previous pass first (lazy greedy)
  LAZY_AFTER_S = 20.0
  LAZY_MOVES = 40

  def __init__(self, mix: _MixModel, rules, total: int,
               max_fraction: float | None, say):
    self.mix, self.rules, self.total = mix, list(rules), total
    self.max_fraction, self.say = max_fraction, say
    self.state: dict[Group, str] = {}
    self.gains: dict[Group, float] = {}
    self.banned: set[Group] = set()
    self._cache: dict[frozenset, _Score | None] = {}
    self._rank: dict[frozenset, float] = {}
    self._lazy = False
    self.all_groups: list[Group] = []
    self.path: list[dict[Group, str]] = []   # the state after each step
    self.last_move: list[Group] = []

  def rules_for(self, state: dict[Group, str]) -> list[QuantizationRule]:
    out = [_group_rule(g, q, self.rules) for g, q in state.items()]
    return list(dict.fromkeys(out)) + self.rules

  def score(self, state: dict[Group, str]) -> _Score | None:
    key = frozenset(state.items())
    if key not in self._cache:
      try:
        codes = self.mix.codes(self.rules_for(state))
        self._cache[key] = _Score(self.mix.sqnr_db(codes),
                                  self.mix.promoted(codes))
      except QliteError:
        self._cache[key] = None      # e.g. an int16 op without 16x8 kernel
    return self._cache[key]

  def _fits(self, s: _Score) -> bool:
    return self.max_fraction is None or \
        s.promoted / max(self.total, 1) <= self.max_fraction

  def _step(self, moves, qtype: str, cur: _Score, full: bool):
    """The best move (most noise removed per boundary promoted), or None."""
    order = list(moves)
    if not full:
      order = sorted(order, key=lambda m: -self._rank.get(m, np.inf))
      order = order[:self.LAZY_MOVES]
    best = None
    for m in order:
      new = [g for g in sorted(m) if self.state.get(g) != qtype and
             g not in self.banned]
      if not new:
        continue
      trial = dict(self.state)
      for g in new:
        trial[g] = qtype
      s = self.score(trial)
      if s is None or not self._fits(s):
        self._rank[m] = -np.inf
        continue
      cost = max(s.promoted - cur.promoted, 0) or 0.5
      ratio = (cur.noise - s.noise) / cost
      self._rank[m] = ratio
      if ratio > 0 and (best is None or ratio > best[0]):
        best = (ratio, new, s)
    return best

  def forward(self, goal: float, moves, qtype: str) -> _Score:
    """Adds moves until the fake-quant SQNR reaches ``goal`` or no move
    helps; returns the score of the state."""
    cur = self.score(self.state)
    while cur.sqnr_db < goal:
      t0 = time.perf_counter()
      best = self._step(moves, qtype, cur, full=not self._lazy)
      if best is None and self._lazy:
        best = self._step(moves, qtype, cur, full=True)
      elif not self._lazy:
        self._lazy = time.perf_counter() - t0 > self.LAZY_AFTER_S
      if best is None:
        break
      _, new, s = best
      self.last_move = list(new)
      for g in new:
        self.state.pop(g, None)
        self.state[g] = qtype
        self.gains[g] = s.sqnr_db - cur.sqnr_db
      self.say(f"autotune: fake-quant {s.sqnr_db:.2f} dB, {s.promoted} "
               f"boundaries: + {', '.join(_name(g) for g in new)}")
      cur = s
      self.path.append(dict(self.state))
    return cur

  def prune(self, goal: float) -> _Score:
    """Drops groups the goal does not need, best first: each step drops
    the (linked) group whose removal adds the least output noise per
    boundary it saves, while the fake-quant SQNR stays at ``goal``."""
    cur = self.score(self.state)
    while True:
      best = None
      for g in list(self.state):
        drop = self.mix.linked([g])
        trial = {k: q for k, q in self.state.items() if k not in drop}
        s = self.score(trial)
        if s is None or s.sqnr_db < goal or s.promoted > cur.promoted:
          continue
        cost = (s.noise - cur.noise) / max(cur.promoted - s.promoted, 0.5)
        if best is None or cost < best[0]:
          best = (cost, g, trial, s)
      if best is None:
        return cur
      _, g, self.state, cur = best
      self.say(f"autotune: pruned {_name(g)} -> {cur.sqnr_db:.2f} dB, "
               f"{cur.promoted} boundaries")

  def drop_module(self, path: str) -> list[Group]:
    return self.drop(g for g in self.all_groups if g[0] == path)

  def drop(self, groups) -> list[Group]:
    """Bans ``groups`` (and those linked to them) from the search;
    returns those that were promoted."""
    ban = self.mix.linked(groups)
    self.banned |= ban
    dropped = [g for g in self.state if g in ban]
    for g in dropped:
      del self.state[g]
    return dropped


def _moves(mix: _MixModel, groups: list[Group]) -> list[frozenset]:
  """Candidate moves: each group; each boundary's producer + readers; each
  module's groups; each module subtree's groups."""
  allowed = set(groups)
  moves = {frozenset([g]) for g in groups}
  for b in mix.bs:
    m = frozenset(mix.groups_reading(b))
    if m & allowed:
      moves.add(m)
  moves = {frozenset(mix.linked(m)) for m in moves}
  paths = {p for p, _ in groups}
  prefixes = set()
  for p in paths:
    parts = p.split("/") if p else []
    prefixes.update("/".join(parts[:k]) for k in range(len(parts) + 1))
  for p in paths:
    moves.add(frozenset(mix.linked(g for g in groups if g[0] == p)))
  for p in prefixes:
    sub = frozenset(g for g in groups
                    if not p or g[0] == p or g[0].startswith(p + "/"))
    if sub:
      moves.add(frozenset(mix.linked(sub)))
  return sorted(moves, key=lambda m: (len(m), sorted(m)))


def autotune(model, rules: Sequence[QuantizationRule], batches, *,
             variables=None, target_sqnr_db: float,
             eval_batches=None, candidates: Sequence[str] = ("int16",),
             allow_float: bool = False, max_fraction: float | None = None,
             method: str = "minmax", latency_threads: int = 1,
             max_exports: int = 8, progress: bool = False
             ) -> tuple[list[QuantizationRule], Any, AutotuneReport]:
  """Promotes the fewest activation boundaries to int16 (or float) until
  the LiteRT model reaches ``target_sqnr_db`` against the float model on
  held-out batches.

  Example usage::

    >>> rules, stats, report = qlite.autotune(
    ...     model, [qlite.QuantizationRule()], batches, variables=variables,
    ...     target_sqnr_db=35.0)
    >>> print(report)
    >>> blob = qlite.export_tflite(model, rules, stats, batches[0][:1],
    ...                            variables=variables)

  The returned rules promote op groups: ``QuantizationRule(module_path=
  <exact path>, op_names=(<primitive>,), act_qtype="int16")``, placed
  before ``rules``.

  Args:
    model: a Linen module (with ``variables``) or an NNX module.
    rules: the starting rules (e.g. all int8); promotions go before them.
    batches: calibration batches (arrays, or tuples of positional arrays).
    variables: the Linen variables.
    target_sqnr_db: the LiteRT vs float SQNR (dB, min over the model's
      outputs) to reach on ``eval_batches``.
    eval_batches: held-out batches; default: the last quarter of
      ``batches`` (at least one), which calibration then does not see.
    candidates: what an op group may be promoted to, cheapest first:
      ``"int16"`` (LiteRT 16x8) and / or ``"float"``.
    allow_float: allow ``"float"`` (a float island: the returned rules
      need ``export_tflite(..., strict=False)``); with int16 candidates,
      float is tried only once int16 misses the target.
    max_fraction: promote at most this fraction of the boundaries (None:
      no limit).
    method: the calibration range method.
    latency_threads: LiteRT threads for the latency figures.
    max_exports: LiteRT exports the search may measure (besides the
      starting rules').
    progress: print the search's steps and each export measured.

  Returns:
    ``(rules, stats, report)``: the promoted rules followed by ``rules``,
    the calibration stats of the returned rules (also valid for ``rules``
    when no module went float), and an :class:`AutotuneReport`
    (promoted op groups, SQNR, size and LiteRT latency cost). When the
    target cannot be reached the rules of the best export are returned and
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
    if c not in (INT16, FLOAT):
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
  eval_batches = list(eval_batches)
  eval_rows = _rows(eval_batches)
  example = _rows(batches[:1])[0]
  ev = _Evaluator(model, variables, eval_rows, latency_threads)
  say = print if progress else (lambda *a, **k: None)

  stats = calibrate(model, rules, batches, variables=variables,
                    method=method, progress=False)

  float_stats: dict[frozenset, Any] = {}

  def stats_for(state) -> Any:
    """The calibration stats of ``state``'s rules: the starting rules'
    for int16 promotions (the same boundaries), a calibration of their own
    with a float module (its boundaries move: e.g. a bias add no longer
    fused into its float matmul)."""
    if all(q != FLOAT for q in state.values()):
      return stats
    key = frozenset(state.items())
    if key not in float_stats:
      float_stats[key] = calibrate(model, search.rules_for(state), batches,
                                   variables=variables, method=method,
                                   progress=False)
    return float_stats[key]

  def export(rs, strict=True, state=None) -> bytes:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return export_tflite(model, rs, stats_for(state or {}), example,
                           variables=variables, strict=strict)

  base_blob = export(rules)
  base_sqnr = ev.sqnr(base_blob)
  say(f"autotune: base {base_sqnr:.1f} dB")
  mix = _MixModel(model, variables, rules, stats, eval_batches)
  total = len(mix.bs)
  search = _Search(mix, rules, total, max_fraction, say)
  steps: list[Step] = []
  skipped: list[tuple[str, str]] = []
  best = (dict(), base_sqnr, base_blob, None)     # state, LiteRT, blob, fq

  def better(s: float, state) -> bool:
    if best[1] >= target_sqnr_db:
      return s >= target_sqnr_db and \
          search.score(state).promoted < search.score(best[0]).promoted
    return s > best[1]

  if base_sqnr < target_sqnr_db:
    groups = list(dict.fromkeys(
        (b.module_path, b.op) for b in mix.bs
        if b.op != "input" and b.rule.act_qtype is not None and
        b.op not in NO_16X8_KERNEL))
    search.all_groups = groups
    exports = 0
    for qtype in candidates:
      if best[1] >= target_sqnr_db:
        break
      if qtype == INT16:
        base16 = {(b.module_path, b.op) for b in mix.bs
                  if symmetric_acts(b.rule.act_qtype)}
        moves = _moves(mix, [g for g in groups if g not in base16])
      else:
        allowed = list(dict.fromkeys(
            (b.module_path, b.op) for b in mix.bs
            if b.op != "input" and b.rule.act_qtype is not None))
        search.all_groups = list(dict.fromkeys(groups + allowed))
        moves = sorted({frozenset(g for g in allowed if g[0] == p)
                        for p, _ in allowed},
                       key=lambda m: (len(m), sorted(m)))
      goal = float(target_sqnr_db)
      lowered = False
      exported: set[frozenset] = set()
      while exports < max_exports:
        s = search.forward(goal, moves, qtype)
        s = search.prune(goal) if s.sqnr_db >= goal else s
        key = frozenset(search.state.items())
        if not search.state or key in exported:
          break
        exported.add(key)
        exports += 1
        strict = all(q != FLOAT for q in search.state.values())
        try:
          blob = export(search.rules_for(search.state), strict=strict,
                        state=search.state)
          lite = ev.sqnr(blob)
          steps.append(Step(s.promoted, lite, None, s.sqnr_db))
        except QliteError as e:
          msg = str(e).split("\n")[0]
          steps.append(Step(s.promoted, -np.inf, msg, s.sqnr_db))
          culprit = _culprit_module(str(e))
          dropped = search.drop_module(culprit) if culprit is not None \
              else []
          if not dropped:         # unnamed: the last move's groups
            dropped = search.drop([g for g in search.last_move
                                   if g in search.state] or
                                  [list(search.state)[-1]])
          skipped += [(_name(g), msg) for g in dropped]
          say(f"autotune: export failed ({msg}); dropped "
              f"{', '.join(_name(g) for g in dropped)}")
          continue
        say(f"autotune: export {s.promoted} boundaries -> LiteRT "
            f"{lite:.2f} dB (fake-quant {s.sqnr_db:.2f})")
        if better(lite, search.state):
          best = (dict(search.state), lite, blob, s.sqnr_db)
        if lowered or (lite < target_sqnr_db and s.sqnr_db < goal):
          break           # no move helps any more
        if lite >= target_sqnr_db:
          # one try with the goal this export's LiteRT - fake-quant gap
          # says is enough (a pruned set; kept only if its export reaches)
          lower = target_sqnr_db - (lite - s.sqnr_db) + 0.05
          if lower > s.sqnr_db - 0.1:
            break
          goal, lowered = lower, True
          continue
        # LiteRT below the fake-quant model: aim that much higher
        goal = max(goal + 0.1, target_sqnr_db + (s.sqnr_db - lite) + 0.05)
      if best[1] >= target_sqnr_db:
        # the search's earlier (smaller) states, bisected by LiteRT: the
        # fake-quant model can be pessimistic (e.g. LiteRT's int8 mean)
        # (only states the largest LiteRT - fake-quant gap measured so far
        # could lift to the target)
        n_best = search.score(best[0]).promoted
        gap = max([base_sqnr - search.score({}).sqnr_db] +
                  [st.sqnr_db - st.predicted_db for st in steps
                   if st.error is None and st.predicted_db is not None])
        path = [st for st in search.path
                if not (set(st) & search.banned) and
                search.score(st) is not None and
                search.score(st).promoted < n_best and
                search.score(st).sqnr_db + gap + 0.25 >= target_sqnr_db]
        lo, hi = -1, len(path)
        while hi - lo > 1 and exports < max_exports:
          mid = (lo + hi) // 2
          st = path[mid]
          exports += 1
          s = search.score(st)
          try:
            blob = export(search.rules_for(st),
                          strict=all(q != FLOAT for q in st.values()),
                          state=st)
            lite = ev.sqnr(blob)
          except QliteError as e:
            steps.append(Step(s.promoted, -np.inf, str(e).split("\n")[0],
                              s.sqnr_db))
            lo = mid
            continue
          steps.append(Step(s.promoted, lite, None, s.sqnr_db))
          say(f"autotune: export {s.promoted} boundaries (an earlier "
              f"state) -> LiteRT {lite:.2f} dB (fake-quant {s.sqnr_db:.2f})")
          if lite >= target_sqnr_db:
            hi = mid
            if better(lite, st):
              best = (dict(st), lite, blob, s.sqnr_db)
          else:
            lo = mid
      if best[0]:
        search.state = dict(best[0])

  state, final_sqnr, final_blob, predicted = best
  final_rules = search.rules_for(state) if state else list(rules)
  final_stats = stats_for(state) if state else stats
  promoted_n = search.score(state).promoted if state else 0
  out = AutotuneReport(
      target_sqnr_db=float(target_sqnr_db),
      reached=bool(final_sqnr >= target_sqnr_db),
      base_sqnr_db=base_sqnr, final_sqnr_db=float(final_sqnr),
      promoted=[(p, o, q, float(search.gains.get((p, o), 0.0)))
                for (p, o), q in state.items()],
      boundaries=total, boundaries_promoted=promoted_n,
      base_size=len(base_blob), final_size=len(final_blob),
      base_latency_ms=ev.latency_ms(base_blob),
      final_latency_ms=ev.latency_ms(final_blob),
      latency_threads=latency_threads, steps=steps, skipped=skipped,
      predicted_sqnr_db=predicted)
  return final_rules, final_stats, out
