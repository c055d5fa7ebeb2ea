"""``qlite.ptq.optimize``: PTQ algorithms that change the weights before the
int8 export, then the calibration of the changed model."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import jax
import numpy as np

from qlite.errors import CalibrationError, QliteError
from qlite.litert.pipeline import calibrate
from qlite.litert.providers import CalibrationProvider, ConversionProvider
from qlite.ptq import (_graph, adaround, bias_correction, equalization,
                       smoothquant)
from qlite.quant.provider import QuantizedModel
from qlite.rules import QuantizationRule

# In the order they run: float-equivalent rescaling first (it changes the
# ranges calibration sees), then the rounding, then the bias correction of
# what error remains.
ALGORITHMS = ("equalization", "smoothquant", "adaround", "bias_correction")
"""The algorithm names :func:`optimize` accepts in ``algorithms``."""
# Chosen by measurement on held-out data (bench/ptq_algorithms.py ->
# bench/RESULTS_ptq.md, 11 bench / zoo models): bias correction gained on 8
# (+0.5 to +8.4 dB, mean +2.16 dB), lost on 1 (tcn -1.55); the others did
# not win broadly (SmoothQuant -0.3 dB on the two random-weight
# transformers it applies to; AdaRound +0.2 to +0.4 dB at int8 for 30 s to
# 12 min per model; equalization +0.4 dB mean on the 5 ReLU conv nets,
# nothing on top of bias correction).
DEFAULT_ALGORITHMS: tuple[str, ...] = ("bias_correction",)
"""The algorithms :func:`optimize` runs when ``algorithms`` is not given
(chosen by measurement: ``bench/RESULTS_ptq.md``)."""


@dataclasses.dataclass
class PtqResult:
  """What :func:`optimize` returns.

  Attributes:
    model: the model to export (Linen: the same module; NNX: a new module
      holding the changed state, the given one is left unchanged).
    variables: the changed Linen variables (None for NNX).
    stats: the calibration of the changed model (its fingerprint matches the
      changed weights: export without ``allow_changed_weights``).
    report: one line per algorithm and layer saying what changed.
  """
  model: Any
  variables: Any
  stats: Any
  report: list[str]

  def export_kwargs(self) -> dict:
    """``model``, ``stats`` and ``variables`` as keyword arguments of
    :func:`qlite.export_tflite`."""
    return dict(model=self.model, stats=self.stats, variables=self.variables)


def _check_algorithms(algorithms) -> tuple[str, ...]:
  if isinstance(algorithms, str):
    algorithms = (algorithms,)
  algorithms = tuple(algorithms)
  bad = [a for a in algorithms if a not in ALGORITHMS]
  if bad:
    raise QliteError(f"qlite.ptq.optimize: unknown algorithm(s) {bad}; "
                     f"choose from {ALGORITHMS}")
  return tuple(a for a in ALGORITHMS if a in algorithms)


def _finite(new, old, name: str, report: list) -> bool:
  """False (and a report line) when ``name`` made a parameter non-finite:
  its changes are then dropped, never exported."""
  for i, (a, b) in enumerate(zip(new, old)):
    if a is not b and not np.all(np.isfinite(np.asarray(a))):
      report.append(f"{name}: produced non-finite values in parameter {i}; "
                    f"its changes were undone")
      return False
  return True


def optimize(model, rules: Sequence[QuantizationRule], batches: Iterable[Any],
             variables=None, *, algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
             method: str = "minmax", progress: bool = False,
             smoothquant_alpha: float = 0.5, adaround_iters: int = 300,
             adaround_batches: int = 4) -> PtqResult:
  """Applies PTQ ``algorithms`` to the weights and calibrates the result.

  Args:
    model: a ``flax.linen.Module`` (pass ``variables``) or ``flax.nnx.Module``.
    rules: the :class:`qlite.QuantizationRule` list of the export.
    batches: calibration batches (as :func:`qlite.calibrate`); read several
      times, so an iterator is materialised into a list.
    variables: the Linen variables; None for NNX.
    algorithms: any of ``"equalization"`` (cross-layer equalization of
      conv / BatchNorm -> ReLU -> conv chains, float-equivalent),
      ``"smoothquant"`` (LayerNorm -> dense scale
      migration, float-equivalent), ``"adaround"`` (data-driven rounding of
      conv / dense weights), ``"bias_correction"`` (removes each layer's
      mean output error via its bias or BatchNorm mean); they run in that
      order. Default ``("bias_correction",)`` (the measured broad win,
      see ``DEFAULT_ALGORITHMS``); empty: plain calibration.
    method: the calibration method (as :func:`qlite.calibrate`).
    progress: show calibration progress bars.
    smoothquant_alpha: migration strength (0: none, 1: all to the weights).
    adaround_iters: Adam steps per layer.
    adaround_batches: calibration batches whose layer inputs AdaRound fits
      on (memory: every layer's input of these batches is held).

  Returns:
    A :class:`PtqResult`; export with
    ``qlite.export_tflite(res.model, rules, res.stats, x, variables=res.variables)``.

  Raises:
    QliteError: an unknown algorithm; the model errors of
      :func:`qlite.calibrate`.
    CalibrationError: ``batches`` is empty, or as :func:`qlite.calibrate`.
  """
  algorithms = _check_algorithms(algorithms)
  batches = list(batches)
  if not batches:
    raise CalibrationError("qlite.ptq.optimize: `batches` is empty; pass at "
                           "least one batch of representative inputs")
  report: list[str] = []
  args = _graph.as_args(batches[0])

  def leaves_of(m, v):
    qm = QuantizedModel(m, CalibrationProvider(rules), v)
    if qm.mf.params is None:
      raise QliteError(f"{qm.mf.description} is a Linen module: pass "
                       f"variables=...")
    return qm, [np.asarray(p) for p in jax.tree.leaves(qm.mf.params)]

  cal = lambda m, v: calibrate(m, rules, batches, variables=v, method=method,
                               progress=progress)
  for name in ("equalization", "smoothquant"):
    if name not in algorithms:
      continue
    qm, leaves = leaves_of(model, variables)
    graph, plan = qm.traced(args)
    layers = _graph.weighted_layers(graph, plan, leaves)
    if name == "equalization":
      new = equalization.equalize(graph, layers, leaves, qm.mf.params,
                                  batches, report)
    else:
      new = smoothquant.migrate(graph, layers, leaves, qm.mf.params, batches,
                                report, alpha=smoothquant_alpha)
    if new is not leaves and _finite(new, leaves, name, report):
      model, variables = _graph.rebuild(model, qm.mf.params, new)
  stats = cal(model, variables)
  changed = False
  before_rounding = None
  for name in ("adaround", "bias_correction"):
    if name not in algorithms:
      continue
    provider = ConversionProvider(rules, stats)
    qm = QuantizedModel(model, provider, variables)
    leaves = [np.asarray(p) for p in jax.tree.leaves(qm.mf.params)]
    graph, plan = qm.traced(args)
    layers = _graph.weighted_layers(graph, plan, leaves)
    if name == "adaround":
      before_rounding = leaves
      new = adaround.fit(graph, plan, provider, layers, leaves, batches,
                         report, iters=adaround_iters,
                         max_batches=adaround_batches)
    else:
      # after AdaRound the weights are on the grid: the rounding error to
      # correct is the one from the weights before it
      new = bias_correction.correct(graph, plan, provider, layers, leaves,
                                    batches, report, reference=before_rounding)
    if not _finite(new, leaves, name, report):
      continue
    model, variables = _graph.rebuild(model, qm.mf.params, new)
    changed = True
  if changed:
    stats = cal(model, variables)
  return PtqResult(model, variables, stats, report)
