"""The NEON (aarch64) paths of the qlite CPU kernels, bit-exact under
emulation: tests/neon/neon_harness.cc (the kernel's core + NEON headers,
every variant -- plain NEON, sdot, smmla/i8mm -- x int8 / int16
activations x int8 / int4 weights x K tiles x row / column tails, against
the scalar reference) is cross-compiled with aarch64-linux-gnu-g++ and run
under qemu-aarch64 on three emulated CPUs (Cortex-A53: plain NEON only;
Cortex-A76: + dotprod; max: + i8mm). The full extension source is also
compiled for aarch64 (sdot / smmla must be emitted).

Needs the Debian packages g++-aarch64-linux-gnu and qemu-user (`make
neon-check` installs them); skipped with that reason when they are absent.
"""

import os
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "qlite", "kernels")
CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which(CXX) is None or shutil.which(QEMU) is None,
        reason="no aarch64 cross compiler / qemu-aarch64: apt-get install -y "
        "g++-aarch64-linux-gnu qemu-user (make neon-check does it)"),
]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
  exe = str(tmp_path_factory.mktemp("neon") / "neon_harness")
  subprocess.run(
      [CXX, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-static",
       "-I", KERNELS, os.path.join(ROOT, "tests", "neon", "neon_harness.cc"),
       "-o", exe], check=True, capture_output=True, text=True, timeout=600)
  return exe


# emulated CPU -> the variants it must run (the others are skipped by the
# harness's run-time feature check)
CPUS = {
    "cortex-a53": {"neon"},
    "cortex-a76": {"neon", "neon_dotprod"},
    "max": {"neon", "neon_dotprod", "neon_i8mm"},
}


@pytest.mark.parametrize("cpu", list(CPUS))
def test_neon_paths_bit_exact_under_qemu(harness, cpu):
  out = subprocess.run([QEMU, "-cpu", cpu, harness], capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  ran = {}
  for line in out.stdout.splitlines():
    if line.endswith("mismatching"):
      name, rest = line.split(": ", 1)
      cases, bad = [int(w) for w in rest.replace(",", "").split()
                    if w.isdigit()]
      ran[name] = (cases, bad)
  assert set(ran) == CPUS[cpu], out.stdout
  for name, (cases, bad) in ran.items():
    assert cases == 36 and bad == 0, (name, out.stdout)


def test_extension_source_compiles_for_aarch64(tmp_path):
  """cpu_kernels.cc with its Python / XLA FFI includes builds for aarch64
  (compile only: there is no aarch64 Python to load it), with the NEON
  dot-product instructions in the object."""
  try:
    import jaxlib
  except ImportError:
    pytest.skip("jaxlib (its XLA FFI headers) is not installed")
  jinc = os.path.join(os.path.dirname(jaxlib.__file__), "include")
  obj = str(tmp_path / "cpu_kernels.o")
  subprocess.run(
      [CXX, "-O2", "-std=c++17", "-Wall", "-Wno-maybe-uninitialized",
       "-Werror", "-fPIC", "-I", KERNELS, "-I",
       sysconfig.get_paths()["include"], "-isystem", jinc, "-c",
       os.path.join(KERNELS, "cpu_kernels.cc"), "-o", obj],
      check=True, capture_output=True, text=True, timeout=600)
  objdump = shutil.which("aarch64-linux-gnu-objdump")
  if objdump:
    dis = subprocess.run([objdump, "-d", obj], capture_output=True,
                         text=True, check=True).stdout
    assert "sdot" in dis and "smmla" in dis
