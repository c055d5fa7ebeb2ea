"""``from qlite.analysis.compare import ...`` keeps working: :func:`compare`
lives in :mod:`qlite.analysis.runner`, the report in
:mod:`qlite.analysis.report`, tensor matching in :mod:`qlite.analysis.matching`.
"""

from qlite.analysis.report import (LAYER_METRICS, PAIRS, REPORT_FORMAT,
                                   LayerRow, OutputRow, PairMetrics, Report)
from qlite.analysis.runner import compare

__all__ = ["compare", "Report", "LayerRow", "OutputRow", "PairMetrics",
           "PAIRS", "LAYER_METRICS", "REPORT_FORMAT"]
