# The two commands: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A clinic install, made as a clinic makes it: non-editable, [clinic] only (no torch, mlflow or
# scikit-learn). tests/test_clinic_install.py checks it, scores and serves with it.
CLINIC       := .venv-clinic
CLINIC_STAMP := $(CLINIC)/.installed
PACKAGE_FILES = $(shell find diagnostics -type f -not -path '*/__pycache__/*' -not -name '*.pyc')

.PHONY: demo test test-all lint format venv clinic-venv clean chromium pacs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Reinstalled (pip always rebuilds a local folder) when the package changes, so the test never
# checks a stale copy.
$(CLINIC_STAMP): pyproject.toml $(PACKAGE_FILES)
	test -x $(CLINIC)/bin/python || $(PYTHON) -m venv $(CLINIC)
	$(CLINIC)/bin/python -m pip install --quiet --upgrade pip
	rm -rf build  # setuptools reuses build/lib and never drops a module deleted since
	$(CLINIC)/bin/python -m pip install --quiet '.[clinic]'
	touch $(CLINIC_STAMP)

clinic-venv: $(CLINIC_STAMP)

demo: $(STAMP)
	$(BIN)/diagnostics demo

# Browser tests drive Debian's Chromium (no browser download). Installed here when missing and
# possible (root with apt); otherwise the browser tests skip and say why.
chromium:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || \
	  echo "note: chromium could not be installed; browser tests will skip"

# The DICOM tests use Debian's Orthanc as the PACS and dcmtk's dsrdump to read our SRs: installed
# the same way, when possible; otherwise those tests skip and say why.
pacs:
	@(command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]) && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] && command -v dsrdump >/dev/null 2>&1 || \
	  [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
	  (apt-get install -y -q orthanc orthanc-dicomweb dcmtk >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q orthanc orthanc-dicomweb dcmtk >/dev/null 2>&1)) || \
	  echo "note: orthanc/dcmtk could not be installed; the PACS tests will skip"

# Default run: everything except `gpu` tests (see pytest addopts in pyproject.toml).
test: $(STAMP) $(CLINIC_STAMP) chromium pacs
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check diagnostics tests benchmarks
	$(BIN)/ruff format --check diagnostics tests benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format diagnostics tests benchmarks
	$(BIN)/ruff check --fix diagnostics tests benchmarks

clean:
	rm -rf $(VENV) $(CLINIC) .diagnostics .pytest_cache .ruff_cache build *.egg-info
