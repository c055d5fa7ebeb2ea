"""Files (issue 16 part 6) and CLI / compare messages (part 7).

Files: .tflite (litert.convert.write_atomic), .npz (QuantStats.save) and
orbax checkpoints (xla.save_qparams) honour the umask, keep an existing
file's mode, fsync before the rename, turn OS errors into QliteErrors
naming the path, take str / os.PathLike (bytes: a clear error); Ctrl-C
leaves nothing. CLI: counts are validated, --no-progress silences every
bar, compare checks the .tflite before calibrating and refuses one of
another model; dict batches and flags in batches get a hint.
"""

import contextlib
import errno
import os
import pathlib
import signal
import stat
import textwrap

import jax
import numpy as np
import pytest
from flax import linen as nn

import qlite
from qlite import cli
from qlite.core import stats as stats_lib
from qlite.litert import convert
from qlite.quant.batches import describe_bad_batch


@contextlib.contextmanager
def umask(mask):
  old = os.umask(mask)
  try:
    yield
  finally:
    os.umask(old)


def mode_of(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def tiny_stats():
  return qlite.QuantStats({"a": {"min": np.float32(-1), "max": np.float32(1)}},
                          {"method": "minmax"})


# The two atomic writers of qlite's files, as (name, write(path)).
WRITERS = [
    ("tflite", lambda path: convert.write_atomic(path, b"TFL3 data")),
    ("npz", lambda path: tiny_stats().save(path)),
]


# --------------------------------------------------------------------------
# Files: modes.

@pytest.mark.parametrize("name,write", WRITERS)
@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600),
                                           (0o002, 0o664)])
def test_new_file_honours_umask(name, write, mask, expected, tmp_path):
  path = tmp_path / f"out.{name}"
  with umask(mask):
    write(path)
  assert mode_of(path) == expected
  assert [p.name for p in tmp_path.iterdir()] == [path.name]   # no temp


@pytest.mark.parametrize("name,write", WRITERS)
def test_overwrite_keeps_existing_mode(name, write, tmp_path):
  path = tmp_path / f"out.{name}"
  path.write_bytes(b"old")
  path.chmod(0o640)
  with umask(0o022):
    write(path)
  assert mode_of(path) == 0o640
  assert path.read_bytes() != b"old"
  path.chmod(0o604)
  with umask(0o077):
    write(path)
  assert mode_of(path) == 0o604


def test_export_tflite_file_mode(tmp_path):
  m, v, stats = _mlp()
  out = tmp_path / "m.tflite"
  with umask(0o022):
    blob = qlite.export_tflite(m, R, stats, X, variables=v, path=out,
                               verify="off")
  assert mode_of(out) == 0o644 and out.read_bytes() == blob


# --------------------------------------------------------------------------
# Files: fsync before the rename.

@pytest.mark.parametrize("name,write", WRITERS)
def test_fsync_before_replace(name, write, tmp_path, monkeypatch):
  calls = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")
                  if os.path.exists(f"/proc/self/fd/{fd}") else fd))
    return real_fsync(fd)

  def replace(src, dst):
    calls.append(("replace", os.fspath(src)))
    return real_replace(src, dst)
  monkeypatch.setattr(os, "fsync", fsync)
  monkeypatch.setattr(os, "replace", replace)
  write(tmp_path / f"out.{name}")
  kinds = [c[0] for c in calls]
  assert "fsync" in kinds and "replace" in kinds, calls
  first_replace = kinds.index("replace")
  assert kinds.index("fsync") < first_replace
  # The fsynced file is the one that is renamed.
  tmp = calls[first_replace][1]
  assert any(k == "fsync" and str(p) == tmp for k, p in calls[:first_replace])


# --------------------------------------------------------------------------
# Files: paths and OS errors.

class MyPath:
  def __init__(self, p):
    self.p = p

  def __fspath__(self):
    return self.p


class BytesPath:
  def __fspath__(self):
    return b"/tmp/x.tflite"


@pytest.mark.parametrize("name,write", WRITERS)
def test_str_and_pathlike_paths(name, write, tmp_path):
  write(str(tmp_path / "a"))
  write(pathlib.Path(tmp_path / "b"))
  write(MyPath(str(tmp_path / "c")))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


@pytest.mark.parametrize("name,write", WRITERS)
@pytest.mark.parametrize("bad,phrase", [
    (b"/tmp/x.out", "got bytes"),
    (BytesPath(), "gave bytes"),
    (3, "got int"),
    ("", "empty"),
])
def test_bad_path_types(name, write, bad, phrase):
  with pytest.raises(qlite.QliteError, match=phrase):
    write(bad)


@pytest.mark.parametrize("name,write", WRITERS)
def test_missing_directory(name, write, tmp_path):
  target = tmp_path / "missing" / "f"
  with pytest.raises(qlite.QliteError, match="does not exist") as e:
    write(target)
  assert str(target) in str(e.value)
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,write", WRITERS)
def test_path_is_a_directory(name, write, tmp_path):
  (tmp_path / "d").mkdir()
  with pytest.raises(qlite.QliteError, match="is a directory") as e:
    write(tmp_path / "d")
  assert str(tmp_path / "d") in str(e.value)
  assert list((tmp_path / "d").iterdir()) == []


@pytest.mark.parametrize("name,write", WRITERS)
def test_parent_is_a_file(name, write, tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(qlite.QliteError, match="not a directory"):
    write(tmp_path / "f" / "out")


@pytest.mark.parametrize("name,write", WRITERS)
def test_permission_denied(name, write, tmp_path, monkeypatch):
  # Root writes anywhere: the OS error is simulated where the file is made.
  def denied(path, *a, **k):
    raise PermissionError(errno.EACCES, "Permission denied", path)
  monkeypatch.setattr(os, "open", denied)
  with pytest.raises(qlite.QliteError, match="permission denied") as e:
    write(tmp_path / "f")
  assert str(tmp_path / "f") in str(e.value)


@pytest.mark.parametrize("err,phrase", [
    (errno.ENOSPC, "no space left"), (errno.EIO, "Input/output error")])
def test_error_while_writing_leaves_old_file(err, phrase, tmp_path):
  path = tmp_path / "f"
  path.write_bytes(b"old")

  def failing(f):
    f.write(b"partial")
    raise OSError(err, os.strerror(err))
  with pytest.raises(qlite.QliteError, match=phrase) as e:
    stats_lib.write_atomic(path, failing, what="test")
  assert str(path) in str(e.value)
  assert path.read_bytes() == b"old"
  assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_keyboard_interrupt_while_writing_leaves_nothing(tmp_path):
  def interrupted(f):
    f.write(b"partial")
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    stats_lib.write_atomic(tmp_path / "f", interrupted, what="test")
  assert list(tmp_path.iterdir()) == []


def test_export_path_as_bytes(tmp_path):
  m, v, stats = _mlp()
  with pytest.raises(qlite.QliteError, match="got bytes"):
    qlite.export_tflite(m, R, stats, X, variables=v, verify="off",
                        path=os.fsencode(str(tmp_path / "m.tflite")))
  assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# Files: orbax checkpoints.

def _params():
  return {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
          "b": np.ones(3, np.float32)}


def _abstract():
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                      _params())


def test_checkpoint_round_trip_modes_and_overwrite(tmp_path):
  from qlite import xla
  path = tmp_path / "ckpt"
  with umask(0o022):
    xla.save_qparams(path, _params())
  assert mode_of(path) == 0o755
  files = [p for p in path.rglob("*") if p.is_file()]
  assert files and all(mode_of(p) == 0o644 for p in files)
  got = xla.restore_qparams(str(path), _abstract())
  np.testing.assert_array_equal(got["w"], _params()["w"])
  with pytest.raises(qlite.QliteError, match="already exists") as e:
    xla.save_qparams(path, _params())
  assert str(path) in str(e.value)
  path.chmod(0o750)
  new = {"w": _params()["w"] * 2, "b": _params()["b"]}
  xla.save_qparams(path, new, overwrite=True)
  assert mode_of(path) == 0o750
  np.testing.assert_array_equal(
      xla.restore_qparams(path, _abstract())["w"], new["w"])
  assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_checkpoint_errors(tmp_path):
  from qlite import xla
  with pytest.raises(qlite.QliteError, match="does not exist") as e:
    xla.save_qparams(tmp_path / "no" / "ckpt", _params())
  assert str(tmp_path / "no") in str(e.value)
  with pytest.raises(qlite.QliteError, match="got bytes"):
    xla.save_qparams(os.fsencode(str(tmp_path / "c")), _params())
  (tmp_path / "file").write_text("x")
  with pytest.raises(qlite.QliteError, match="not a directory"):
    xla.save_qparams(tmp_path / "file", _params(), overwrite=True)
  with pytest.raises(qlite.QliteError, match="does not exist") as e:
    xla.restore_qparams(tmp_path / "missing", _abstract())
  assert str(tmp_path / "missing") in str(e.value)
  with pytest.raises(qlite.QliteError, match="not a checkpoint"):
    xla.restore_qparams(tmp_path / "file", _abstract())
  (tmp_path / "empty").mkdir()
  with pytest.raises(qlite.QliteError, match="cannot restore"):
    xla.restore_qparams(tmp_path / "empty", _abstract())


# --------------------------------------------------------------------------
# Ctrl-C.

def test_sigint_held_during_conversion(monkeypatch):
  ran = []

  def fake(module, input_names, output_names, *, quantized, weights):
    os.kill(os.getpid(), signal.SIGINT)     # Ctrl-C inside the converter
    ran.append("after the signal")
    return b"blob"
  monkeypatch.setattr(convert, "_convert_stablehlo", fake)
  with pytest.raises(KeyboardInterrupt):
    convert.convert_stablehlo(b"", [], [], quantized=True)
  assert ran == ["after the signal"]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  assert convert.convert_stablehlo.__module__ == "qlite.litert.convert"


def test_sigint_deferred_without_a_signal_changes_nothing():
  with convert.sigint_deferred():
    pass
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_watch_remembers_a_swallowed_interrupt():
  with convert.SigintWatch() as watch:
    watch.check()
    try:
      os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
      pass                      # swallowed, as in jax's gc callback
    with pytest.raises(KeyboardInterrupt):
      watch.check()
    # Held inside the converter, counted once delivered.
    with pytest.raises(KeyboardInterrupt):
      with convert.sigint_deferred():
        os.kill(os.getpid(), signal.SIGINT)
    assert watch.count == 2
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --------------------------------------------------------------------------
# Batches.

@pytest.mark.parametrize("batch,phrases", [
    ({"x": np.zeros(3)}, ["is a dict", "positional", "'x'"]),
    ((np.zeros(3), True), ["argument 1 is the Python bool True",
                           "functools.partial(model.apply, train=False)"]),
    ((np.zeros(3), np.array(False)), ["0-d bool array", "functools.partial"]),
    ((np.zeros(3), {"m": np.zeros(2)}), ["argument 1 is a dict"]),
    ((np.zeros(3), None), ["argument 1 is None"]),
    (False, ["Python bool False"]),
])
def test_describe_bad_batch(batch, phrases):
  msg = describe_bad_batch(batch, what="calibration batch 2")
  assert msg is not None and msg.startswith("calibration batch 2")
  for p in phrases:
    assert p in msg, msg


@pytest.mark.parametrize("batch", [
    np.zeros((2, 3)), (np.zeros((2, 3)),), [np.zeros(2), np.zeros(2)],
    (np.zeros((2, 3)), np.zeros((2, 4), bool)),     # a mask is data
    (np.zeros((2, 3)), np.int32(3)),
])
def test_good_batches_pass(batch):
  assert describe_bad_batch(batch) is None


# --------------------------------------------------------------------------
# compare (API) with a .tflite of another model.

class Tiny(nn.Module):
  width: int = 16
  depth: int = 1

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(4)(x)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))


X = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
R = [qlite.QuantizationRule()]
RNG = np.random.default_rng(0)
BATCHES = [RNG.normal(size=(8, 6)).astype(np.float32) for _ in range(3)]


def _mlp():
  m = MLP()
  v = m.init(jax.random.key(0), X)
  return m, v, qlite.calibrate(m, R, [X, X * 0.5], variables=v,
                               progress=False)


def _export(model, seed=0, out=None):
  v = model.init(jax.random.key(seed), BATCHES[0])
  stats = qlite.calibrate(model, R, BATCHES, variables=v, progress=False)
  blob = qlite.export_tflite(model, R, stats, BATCHES[0][:1], variables=v,
                             path=out)
  return v, stats, blob


@pytest.fixture(scope="module")
def tiny_exports():
  """{name: (model, variables, stats, blob)}: a = Tiny(16), b = Tiny(32)
  (other widths, same in / out), c = Tiny(16) with other weights, d =
  Tiny(8, depth 3)."""
  out = {}
  for name, model, seed in (("a", Tiny(16), 0), ("b", Tiny(32), 0),
                            ("c", Tiny(16), 1), ("d", Tiny(8, 3), 0)):
    out[name] = (model,) + _export(model, seed)
  return out


@pytest.mark.parametrize("other,phrase", [
    ("b", "only 0 of the model's 2 quantized weights"),
    ("d", "quantized activations have a tensor of their shape"),
])
def test_compare_refuses_tflite_of_another_model(tiny_exports, other, phrase):
  model, v, stats, _ = tiny_exports["a"]
  blob = tiny_exports[other][3]
  with pytest.raises(qlite.QliteError, match=phrase) as e:
    qlite.compare(model, R, stats, blob, BATCHES, variables=v,
                  progress=False)
  assert "does not fit linen:Tiny" in str(e.value)
  assert "another model" in str(e.value)


def test_compare_names_the_file_and_checks_outputs(tiny_exports, tmp_path):
  from qlite.analysis.runner import check_io_fits
  other = tmp_path / "other.tflite"
  m = MLP()   # 6 -> 4 as well, but check_io_fits sees a 2-output model
  _export(m, out=other)

  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(x), nn.Dense(2)(x)
  two = Two()
  v2 = two.init(jax.random.key(0), BATCHES[0])
  with pytest.raises(qlite.QliteError, match="its outputs") as e:
    check_io_fits(other, two, v2, BATCHES[0])
  assert str(other) in str(e.value)
  stats2 = qlite.calibrate(two, R, BATCHES, variables=v2, progress=False)
  with pytest.raises(qlite.QliteError, match=r"it has 1 output\(s\)") as e:
    qlite.compare(two, R, stats2, other, BATCHES, variables=v2,
                  progress=False)
  assert str(other) in str(e.value)


def test_compare_same_graph_other_weights_warns(tiny_exports):
  model, v, stats, _ = tiny_exports["a"]
  with pytest.warns(UserWarning, match="other stats or from other weights"):
    qlite.compare(model, R, stats, tiny_exports["c"][3], BATCHES,
                  variables=v, progress=False)


def test_compare_own_tflite_passes_quietly(tiny_exports):
  import warnings
  model, v, stats, blob = tiny_exports["a"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    rep = qlite.compare(model, R, stats, blob, BATCHES, variables=v,
                        progress=False)
  assert rep.outputs[0].max_lsb <= 2.0


@pytest.mark.parametrize("batch,phrase", [
    ({"x": BATCHES[0]}, "batch 0 is a dict"),
    ((BATCHES[0], True), "argument 1 is the Python bool True"),
])
def test_compare_bad_batches(tiny_exports, batch, phrase):
  model, v, stats, blob = tiny_exports["a"]
  with pytest.raises(qlite.QliteError, match=phrase):
    qlite.compare(model, R, stats, blob, [batch], variables=v,
                  progress=False)


# --------------------------------------------------------------------------
# The CLI.

ENTRY = "qlite_files_cli_entry"


@pytest.fixture
def entry(tmp_path, monkeypatch):
  """An ENTRY module with make_a (Tiny 16), make_b (Tiny 32), make_dict
  (dict batches), make_flag ((x, True) batches), make_interrupt (Ctrl-C
  while loading)."""
  (tmp_path / f"{ENTRY}.py").write_text(textwrap.dedent("""
      import os, signal
      import jax
      import numpy as np
      from flax import linen as nn

      class Tiny(nn.Module):
        width: int = 16
        @nn.compact
        def __call__(self, x, train: bool = False):
          x = nn.relu(nn.Dense(self.width)(x))
          return nn.Dense(4)(x)

      def _make(width):
        model = Tiny(width)
        rng = np.random.default_rng(0)
        batches = [rng.normal(size=(8, 6)).astype(np.float32)
                   for _ in range(3)]
        variables = model.init(jax.random.key(0), batches[0])
        return model, variables, batches

      def make_a(): return _make(16)
      def make_b(): return _make(32)

      def make_dict():
        m, v, b = _make(16)
        return m, v, [{"x": x} for x in b]

      def make_flag():
        m, v, b = _make(16)
        return m, v, [(x, True) for x in b]

      def make_interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        return _make(16)
  """))
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.chdir(tmp_path)
  return tmp_path


def _argparse_error(capsys, argv):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  return capsys.readouterr().err


@pytest.mark.parametrize("argv,phrase", [
    (["export", "m:f", "--out", "x", "--calib-batches", "-1"],
     "--calib-batches: must be positive, got -1"),
    (["export", "m:f", "--out", "x", "--calib-batches", "0"],
     "must be positive, got 0"),
    (["export", "m:f", "--out", "x", "--calib-batches", "two"],
     "expected a whole number, got 'two'"),
    (["compare", "m:f", "x.tflite", "--calib-batches", "-3"],
     "must be positive, got -3"),
    (["compare", "m:f", "x.tflite", "--batches", "0"],
     "--batches: must be positive, got 0"),
    (["compare", "m:f", "x.tflite", "--worst", "-1"],
     "--worst: must be >= 0, got -1"),
    (["demo", "--steps", "-5"], "--steps: must be positive"),
])
def test_cli_rejects_bad_counts(capsys, argv, phrase):
  assert phrase in _argparse_error(capsys, argv)


def test_cli_compare_checks_the_file_before_calibrating(entry, capsys,
                                                         monkeypatch):
  def no_calibration(*a, **k):
    raise AssertionError("calibrated before checking the .tflite")
  monkeypatch.setattr(qlite, "calibrate", no_calibration)
  assert cli.main(["compare", f"{ENTRY}:make_a", "missing.tflite"]) == 2
  assert "no such .tflite file 'missing.tflite'" in capsys.readouterr().err
  (entry / "junk.tflite").write_bytes(b"not a model at all")
  assert cli.main(["compare", f"{ENTRY}:make_a", "junk.tflite"]) == 2
  assert "junk.tflite" in capsys.readouterr().err
  (entry / "dir.tflite").mkdir()
  assert cli.main(["compare", f"{ENTRY}:make_a", "dir.tflite"]) == 2
  assert "is not a file" in capsys.readouterr().err


def test_cli_export_checks_the_output_before_calibrating(entry, capsys,
                                                         monkeypatch):
  def no_calibration(*a, **k):
    raise AssertionError("calibrated before checking the output path")
  monkeypatch.setattr(qlite, "calibrate", no_calibration)
  assert cli.main(["export", f"{ENTRY}:make_a", "--out",
                   "nodir/m.tflite"]) == 2
  assert "does not exist" in capsys.readouterr().err
  (entry / "d").mkdir()
  assert cli.main(["export", f"{ENTRY}:make_a", "--out", "d"]) == 2
  assert "is a directory" in capsys.readouterr().err


def test_cli_compare_refuses_another_models_tflite(entry, capsys):
  assert cli.main(["export", f"{ENTRY}:make_b", "--out", "b.tflite",
                   "--no-progress"]) == 0
  capsys.readouterr()
  rc = cli.main(["compare", f"{ENTRY}:make_a", "b.tflite", "--no-progress"])
  err = capsys.readouterr().err
  assert rc == 2
  assert "b.tflite does not fit linen:Tiny" in err
  assert "quantized weights have a constant of their size" in err


def test_cli_no_progress_silences_every_bar(entry, capsys):
  assert cli.main(["export", f"{ENTRY}:make_a", "--out", "a.tflite",
                   "--no-progress"]) == 0
  err = capsys.readouterr().err
  assert "qlite calibrate" not in err and "batch/s" not in err
  assert cli.main(["compare", f"{ENTRY}:make_a", "a.tflite",
                   "--no-progress"]) == 0
  out, err = capsys.readouterr()
  assert "unmatched: none" in out
  assert "qlite calibrate" not in err and "qlite compare:" not in err
  assert "batch/s" not in err
  assert mode_of(entry / "a.tflite") == 0o666 & ~_current_umask()


def _current_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@pytest.mark.parametrize("maker,phrase", [
    ("make_dict", "batch 0 is a dict (keys 'x')"),
    ("make_flag", "argument 1 is the Python bool True"),
])
def test_cli_bad_batches_named_before_calibrating(entry, capsys, maker,
                                                  phrase):
  assert cli.main(["export", f"{ENTRY}:{maker}", "--out", "m.tflite",
                   "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert phrase in err and "functools.partial" in err
  assert not (entry / "m.tflite").exists()


def test_cli_ctrl_c_exits_cleanly_and_writes_nothing(entry, capsys):
  assert cli.main(["export", f"{ENTRY}:make_interrupt", "--out",
                   "m.tflite"]) == 130
  assert "qlite: interrupted" in capsys.readouterr().err
  assert not (entry / "m.tflite").exists()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_cli_swallowed_ctrl_c_still_writes_nothing(entry, capsys,
                                                   monkeypatch):
  """jax prints and ignores a KeyboardInterrupt raised in its gc callback:
  the export then finishes; the CLI must not write the file."""
  real = qlite.export_tflite

  def export(*a, **k):
    try:
      os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
      pass                      # swallowed, as in jax's gc callback
    return real(*a, **k)
  monkeypatch.setattr(qlite, "export_tflite", export)
  assert cli.main(["export", f"{ENTRY}:make_a", "--out", "m.tflite",
                   "--no-progress"]) == 130
  assert not (entry / "m.tflite").exists()
  assert [p.name for p in entry.iterdir() if p.name.startswith(".qlite")] \
      == []
