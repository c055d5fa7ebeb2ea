"""QuantStats: calibration records per boundary, saved to / loaded from one ``.npz``.

File format (``format = "qlite.QuantStats"``, ``version = 1``): one
uncompressed ``.npz``. Array ``r{i}.{j}`` is statistic ``j`` of record ``i``;
array ``__index__`` holds UTF-8 JSON bytes (uint8) with the format tag, the
record names and statistic names in order, and ``meta``. Boundary names are
arbitrary strings, so they live only in the JSON, never in member names.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import secrets
import stat
from typing import Any, Callable, IO, Iterator, Mapping, Sequence

import jax
import numpy as np

from qlite.errors import CalibrationError, QliteError

__all__ = ["QuantStats", "MissingRecordError", "FORMAT", "FORMAT_VERSION"]

FORMAT = "qlite.QuantStats"
FORMAT_VERSION = 1
_INDEX = "__index__"


class MissingRecordError(CalibrationError, KeyError):
  """A boundary name has no record in a :class:`QuantStats` (also a KeyError)."""

  def __str__(self) -> str:  # KeyError would quote the message.
    return str(self.args[0]) if self.args else ""


def _check_json(meta: Mapping[str, Any]) -> dict[str, Any]:
  try:
    text = json.dumps(dict(meta), sort_keys=True)
  except (TypeError, ValueError) as e:
    raise QliteError(f"QuantStats meta must be JSON-serialisable: {e}") from e
  return json.loads(text)


# --------------------------------------------------------------------------
# Files. The one atomic writer of qlite's output files (QuantStats .npz here,
# .tflite through qlite.litert.convert.write_atomic): it lives at this layer
# so that both can use it.

def check_path(path, what: str) -> str:
  """Returns ``path`` (``str`` or ``os.PathLike``) as a ``str``.

  Raises:
    QliteError: ``path`` is bytes (or a PathLike giving bytes), another
      type, empty, or holds a NUL character.
  """
  if isinstance(path, (bytes, bytearray, memoryview)):
    raise QliteError(
        f"{what}: the path must be a str or os.PathLike, got bytes "
        f"{bytes(path)!r}; pass a str (e.g. os.fsdecode(path)) or a "
        f"pathlib.Path")
  if not isinstance(path, (str, os.PathLike)):
    raise QliteError(f"{what}: the path must be a str or os.PathLike, got "
                     f"{type(path).__name__} {path!r}")
  text = os.fspath(path)
  if isinstance(text, bytes):
    raise QliteError(
        f"{what}: the path must be a str or os.PathLike giving a str; "
        f"{type(path).__name__} gave bytes {text!r}; pass a str "
        f"(e.g. os.fsdecode(path))")
  if not text:
    raise QliteError(f"{what}: the path is empty")
  if "\0" in text:
    raise QliteError(f"{what}: the path {text!r} contains a NUL character")
  return text


_REASONS = {
    errno.ENOENT: "no such file or directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "it is a directory",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "the file system is read-only",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.EDQUOT: "the disk quota is exceeded",
}


def os_error_message(what: str, action: str, path: str, e: OSError) -> str:
  """``"<what>: cannot <action> '<path>': <reason>"`` for an OSError."""
  reason = _REASONS.get(e.errno, e.strerror or type(e).__name__)
  if e.errno in (errno.EACCES, errno.EPERM):
    reason += (f" (is {os.path.dirname(os.path.abspath(path))!r} "
               f"writable?)" if action == "write" else "")
  return f"{what}: cannot {action} {path!r}: {reason}"


def _fsync_directory(directory: str) -> None:
  """Makes a rename in ``directory`` durable (best effort: not every OS or
  file system can open / fsync a directory)."""
  flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
  try:
    fd = os.open(directory, flags)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_atomic(path, write: Callable[[IO[bytes]], Any], *,
                 what: str = "qlite") -> str:
  """Writes a file atomically: ``write(f)`` fills a new temporary file in
  the directory of ``path`` (``f`` a binary file object), which is flushed,
  fsynced and renamed over ``path``. Returns ``path`` as a ``str``.

  The new file's mode follows the umask (0644 under umask 022), like
  ``open(path, "wb")``; an existing file keeps its mode. On any error, or a
  KeyboardInterrupt, the temporary file is removed and ``path`` is left as
  it was.

  Raises:
    QliteError: a bad path (see :func:`check_path`), a missing directory,
      ``path`` is a directory, or any OSError while writing (permission
      denied, disk full...): the message starts with ``what`` and names
      the path.
  """
  path = check_path(path, what)
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    if os.path.exists(directory):
      raise QliteError(f"{what}: cannot write {path!r}: {directory!r} is "
                       f"not a directory")
    raise QliteError(f"{what}: cannot write {path!r}: directory "
                     f"{directory!r} does not exist; create it first")
  if os.path.isdir(path):
    raise QliteError(f"{what}: cannot write {path!r}: it is a directory; "
                     f"give a file name")
  try:
    mode = stat.S_IMODE(os.stat(path).st_mode)
  except FileNotFoundError:
    mode = None                  # a new file: the umask decides
  except OSError as e:
    raise QliteError(os_error_message(what, "write", path, e)) from None
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) \
      | getattr(os, "O_BINARY", 0)
  while True:
    tmp = os.path.join(directory, f".qlite-{secrets.token_hex(6)}.tmp")
    try:
      fd = os.open(tmp, flags, 0o666)   # 0o666 & ~umask, as open() does
      break
    except FileExistsError:
      continue
    except OSError as e:
      raise QliteError(os_error_message(what, "write", path, e)) from None
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      if mode is not None:
        if hasattr(os, "fchmod"):
          os.fchmod(f.fileno(), mode)
        else:
          os.chmod(tmp, mode)
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    if isinstance(e, OSError):
      raise QliteError(os_error_message(what, "write", path, e)) from None
    raise
  _fsync_directory(directory)
  return path


@jax.tree_util.register_pytree_node_class
class QuantStats:
  """Calibration records keyed by boundary name, plus JSON metadata.

  What :func:`qlite.calibrate` returns and :func:`qlite.export_tflite`,
  ``qlite.xla.PtqProvider`` and :func:`qlite.compare` take.
  ``records[name][stat]`` is a numpy array (see
  :mod:`qlite.core.calibration` for the statistics); boundary names are a
  module path and op (e.g. ``"Dense_0/dot_general"``) or ``"input<i>"``.
  Mapping-like (``stats[name]``, ``in``, ``len``, ``keys()``, ``items()``,
  ``get()``), a pytree whose leaves are the arrays, and saved to / loaded
  from one ``.npz`` (:meth:`save`, :meth:`load`).

  Args:
    records: ``{boundary name: {statistic name: array}}``.
    meta: a JSON-serialisable dict (e.g. ``num_batches``, ``method``, model
      fingerprint, qlite version).
    samples: a few calibration input rows (flat positional arrays) kept for
      the export's self-check (``export_tflite(verify=...)``).

  Attributes:
    records: the records (numpy arrays).
    meta: the metadata.
    samples: the kept input rows (saved in the ``.npz``; not pytree leaves
      and not compared by ``==``).

  Raises:
    QliteError: ``meta`` is not JSON-serialisable, or a record name is not a
      string.
    MissingRecordError: ``stats[name]`` for a boundary with no record (a
      ``CalibrationError`` and a ``KeyError``).

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> stats = qlite.calibrate(model, [qlite.QuantizationRule()], [x, -x],
    ...                         variables=variables, progress=False)
    >>> stats.num_batches, stats.meta["method"]
    (2, 'minmax')
    >>> float(stats["input0"]["min"]), float(stats["input0"]["max"])
    (-1.0, 1.0)
  """

  def __init__(self, records: Mapping[str, Mapping[str, Any]] | None = None,
               meta: Mapping[str, Any] | None = None,
               samples: Sequence[Any] | None = None):
    """Builds QuantStats; raises QliteError if ``meta`` is not JSON-serialisable
    or a record name is not a string. ``samples``: a few calibration input
    rows (flat positional arrays) kept for the export's self-check."""
    self.records: dict[str, dict[str, np.ndarray]] = {}
    for name, record in (records or {}).items():
      if not isinstance(name, str):
        raise QliteError(f"QuantStats record names must be str, got {name!r}.")
      self.records[name] = {str(k): np.asarray(v) for k, v in record.items()}
    self.meta: dict[str, Any] = _check_json(meta or {})
    self.samples: list[np.ndarray] = [np.asarray(a) for a in samples or ()]

  # Mapping-like access.
  def __getitem__(self, name: str) -> dict[str, np.ndarray]:
    """Returns the record of boundary ``name``; raises MissingRecordError (a KeyError)."""
    try:
      return self.records[name]
    except KeyError:
      known = list(self.records)
      shown = ", ".join(repr(k) for k in known[:10])
      more = f" (+{len(known) - 10} more)" if len(known) > 10 else ""
      raise MissingRecordError(
          f"No calibration statistics for {name!r}; known boundaries: "
          f"{shown or 'none'}{more}. Re-run calibration with the same model "
          "and rules.") from None

  def __contains__(self, name: object) -> bool:
    return name in self.records

  def __iter__(self) -> Iterator[str]:
    return iter(self.records)

  def __len__(self) -> int:
    return len(self.records)

  def keys(self):
    """Returns the boundary names (a dict keys view)."""
    return self.records.keys()

  def items(self):
    """Returns ``(name, record)`` pairs (a dict items view)."""
    return self.records.items()

  def get(self, name: str, default=None):
    """Returns the record of ``name``, or ``default`` if absent."""
    return self.records.get(name, default)

  @property
  def num_batches(self) -> int | None:
    """Returns ``meta["num_batches"]``, else the first record's ``num_batches``, else None."""
    if "num_batches" in self.meta:
      return self.meta["num_batches"]
    for record in self.records.values():
      if "num_batches" in record:
        return int(record["num_batches"])
    return None

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, QuantStats):
      return NotImplemented
    if self.meta != other.meta or self.records.keys() != other.records.keys():
      return False
    for name, record in self.records.items():
      theirs = other.records[name]
      if record.keys() != theirs.keys():
        return False
      for k, v in record.items():
        w = theirs[k]
        if (v.dtype != w.dtype or v.shape != w.shape
            or v.tobytes() != w.tobytes()):
          return False
    return True

  __hash__ = None  # mutable

  def __repr__(self) -> str:
    extra = "".join(f", {k}={self.meta[k]!r}" for k in ("method",)
                    if k in self.meta)
    return (f"QuantStats({len(self.records)} records, "
            f"{self.num_batches} batches{extra})")

  # Pytree.
  def tree_flatten(self):
    """Pytree protocol: the statistic arrays are the leaves; the boundary
    and statistic names and ``meta`` the static part (``samples`` are not
    carried)."""
    names = tuple(self.records)
    stat_names = tuple(tuple(self.records[n]) for n in names)
    leaves = [self.records[n][s] for n, ss in zip(names, stat_names) for s in ss]
    aux = (names, stat_names, json.dumps(self.meta, sort_keys=True))
    return leaves, aux

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    """Pytree protocol: rebuilds the stats from :meth:`tree_flatten`'s
    parts (without ``samples``)."""
    names, stat_names, meta = aux
    obj = object.__new__(cls)
    it = iter(leaves)
    obj.records = {n: {s: next(it) for s in ss} for n, ss in zip(names, stat_names)}
    obj.meta = json.loads(meta)
    obj.samples = []          # input rows are not part of the pytree
    return obj

  # Files.
  def save(self, path: str | os.PathLike) -> None:
    """Writes the stats to ``path`` (one ``.npz``, written atomically).

    The format is described in this module's docstring; :meth:`load` reads
    it back equal (``QuantStats.load(path) == stats``). The file honours the
    umask (0644 under umask 022); overwriting keeps the existing file's
    mode. It is written to a temporary file in the same directory, fsynced,
    then renamed over ``path``: an error or Ctrl-C leaves no partial file.

    Args:
      path: the file to write, a ``str`` or ``os.PathLike`` (exactly this
        name: no ``.npz`` is appended); its directory must exist.

    Returns:
      None.

    Raises:
      QliteError: ``path`` is not a ``str`` / ``os.PathLike`` (e.g. bytes),
        its directory does not exist, it is a directory, or writing failed
        (permission denied, disk full...); the message names the path.

    Example:
      >>> stats.save("stats.npz")        # stats: the class example's
      >>> qlite.QuantStats.load("stats.npz") == stats
      True
    """
    names = list(self.records)
    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "records": [[n, list(self.records[n])] for n in names],
        "meta": self.meta,
        "samples": len(self.samples),
    }
    arrays = {_INDEX: np.frombuffer(json.dumps(index).encode("utf-8"), np.uint8)}
    for i, n in enumerate(names):
      for j, s in enumerate(self.records[n]):
        arrays[f"r{i}.{j}"] = np.asarray(self.records[n][s])
    for i, a in enumerate(self.samples):
      arrays[f"s{i}"] = a
    write_atomic(path, lambda f: np.savez(f, **arrays),
                 what="QuantStats.save")

  @classmethod
  def from_ranges(cls, ranges: Mapping[str, tuple[float, float]],
                  meta: Mapping[str, Any] | None = None) -> "QuantStats":
    """Returns stats whose every aggregation gives exactly ``ranges[key] =
    (lo, hi)`` (e.g. ranges learned by QAT), with method ``minmax``."""
    records = {}
    for key, (lo, hi) in ranges.items():
      lo, hi = np.float64(lo), np.float64(hi)
      records[key] = {"min": lo, "max": hi, "absmax": max(abs(lo), abs(hi)),
                      "sumsq": np.float64(0.0), "count": np.int64(1),
                      "ema_min": lo, "ema_max": hi, "p_lo_sum": lo,
                      "p_hi_sum": hi, "num_batches": np.int64(1)}
    return cls(records, {"method": "minmax", **(meta or {})})

  @classmethod
  def load(cls, path: str | os.PathLike) -> "QuantStats":
    """Returns the QuantStats saved at ``path`` by :meth:`save`.

    Args:
      path: the ``.npz`` file.

    Returns:
      The :class:`QuantStats` (equal to the saved one).

    Raises:
      CalibrationError: the file is missing, unreadable, not an ``.npz``,
        not a QuantStats file (or a newer version), incomplete, or holds
        NaN/Inf statistics (the message names the path and the problem).

    Example:
      >>> stats = qlite.QuantStats.load("stats.npz")
      >>> stats.meta["method"]
      'minmax'
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise CalibrationError(f"QuantStats file {path!r} does not exist.")
    try:
      with open(path, "rb") as f:
        data = f.read()
      npz = np.load(io.BytesIO(data), allow_pickle=False)
      if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError("it holds a single .npy array, not an .npz archive")
      with npz:
        arrays = {k: npz[k] for k in npz.files}
    except Exception as e:  # zipfile / numpy raise many types here.
      raise CalibrationError(
          f"Cannot read QuantStats file {path!r}: corrupted or not a .npz "
          f"file ({type(e).__name__}: {e}).") from e
    if _INDEX not in arrays:
      raise CalibrationError(
          f"{path!r} is a .npz file but not a qlite QuantStats file "
          f"(no {_INDEX!r} entry).")
    try:
      index = json.loads(arrays.pop(_INDEX).tobytes().decode("utf-8"))
      fmt, version = index["format"], index["version"]
      entries, meta = index["records"], index["meta"]
    except Exception as e:
      raise CalibrationError(
          f"QuantStats file {path!r} has a corrupted index ({e}).") from e
    if fmt != FORMAT or not isinstance(version, int) or version > FORMAT_VERSION:
      raise CalibrationError(
          f"{path!r} has format {fmt!r} version {version!r}; expected "
          f"{FORMAT!r} version <= {FORMAT_VERSION}.")
    records = {}
    for i, (name, stat_names) in enumerate(entries):
      record = {}
      for j, s in enumerate(stat_names):
        key = f"r{i}.{j}"
        if key not in arrays:
          raise CalibrationError(
              f"QuantStats file {path!r} is incomplete: statistic {s!r} of "
              f"{name!r} is missing.")
        value = arrays[key]
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
          raise CalibrationError(
              f"QuantStats file {path!r}: statistic {s!r} of {name!r} is "
              "NaN/Inf; the calibration data contained NaN/Inf. Re-run "
              "calibration on finite data.")
        record[s] = value
      records[name] = record
    samples = [arrays[f"s{i}"] for i in range(int(index.get("samples", 0)))
               if f"s{i}" in arrays]
    return cls(records, meta, samples)
