# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-slow install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qlite demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info digits_int8.tflite docs/_build docs/api docs/_generated

.PHONY: fuzz zoo bench bench-quick bench-xla
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/odml.py
	$(PY) bench/xla_ptq.py

bench-quick: $(BENCH_STAMP)
	$(PY) bench/odml.py --quick

bench-xla: $(STAMP)
	$(PY) bench/xla_ptq.py

# Pallas kernels on the accelerator (issue 19): correctness against XLA and
# speed against bf16 in one run (< 5 min), table in
# bench/RESULTS_device_check_<backend>.md. With an NVIDIA GPU and a CPU-only
# jax, installs the [gpu] extra first. On CPU: interpret mode, correctness only.
.PHONY: device-check
device-check: $(STAMP)
	@if command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import jax_cuda12_plugin" 2>/dev/null; then \
	  $(PY) -m pip install -q -e ".[gpu]"; fi
	$(PY) bench/device_check.py

fuzz: $(STAMP)
	$(PY) tests/fuzz_models.py 200

zoo: $(STAMP)
	$(VENV)/bin/qlite zoo

# The documentation site (Sphinx + MyST): guides in docs/*.md, the API
# reference generated from the docstrings; warnings fail the build.
.PHONY: docs
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) -m sphinx -E -W --keep-going -q -b html -d docs/_build/doctrees docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

# The HTML compare report (examples/compare_html.py: a layer with a wrong
# scale) rendered by headless Chromium; installs chromium when missing.
.PHONY: report-screenshot
CHROMIUM ?= chromium
report-screenshot: $(STAMP)
	command -v $(CHROMIUM) >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -q chromium)
	mkdir -p docs/img
	$(PY) examples/compare_html.py --html docs/img/compare_report.html
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --hide-scrollbars \
	  --window-size=1100,1250 --screenshot=docs/img/compare_report.png \
	  file://$(CURDIR)/docs/img/compare_report.html

# NEON kernel paths bit-exact under qemu (issue 19): installs the aarch64
# cross compiler and qemu-user (Debian packages), then runs the slow test.
.PHONY: neon-check
neon-check: $(STAMP)
	command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || \
	  (apt-get update -qq && apt-get install -y -q g++-aarch64-linux-gnu qemu-user)
	$(PY) -m pytest -q -m slow tests/test_neon_kernels.py
