"""The built-in calibration range methods, one module each; each module's
``METHOD`` is registered by :mod:`qlite.core.calibration` in the order of
:data:`BUILTIN` (a new built-in method: one module, one entry here)."""

from qlite.core.calibration.methods import absmax
from qlite.core.calibration.methods import fixed
from qlite.core.calibration.methods import minmax
from qlite.core.calibration.methods import mse
from qlite.core.calibration.methods import percentile
from qlite.core.calibration.methods import quantile
from qlite.core.calibration.methods import rms

BUILTIN = (minmax.METHOD, absmax.METHOD, rms.METHOD, fixed.METHOD,
           percentile.METHOD, mse.METHOD, quantile.METHOD)
"""The built-in :class:`~qlite.core.calibration.registry.CalibrationMethod` s."""
