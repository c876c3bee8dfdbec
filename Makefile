# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo venv clean pi-check pi-matrix fuzz

venv: $(STAMP)

# Install CPU torch by its exact version first, so pip never resolves an unpinned
# torch (which would pull several GB of CUDA packages), then the project itself.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[build,dev]"
	touch $(STAMP)

test: lint
	$(PY) -m pytest

# ruff (lint + format) over the whole tree; mypy over every package, then tests/ and benchmarks/ against them. mypy
# reads the packages through a tree of links named as the installed package (build/typecheck/edgeshift/...), since
# the folders install under other names.
PACKAGES := runtime device_profiles pruner exporter
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf build/typecheck && mkdir -p build/typecheck/edgeshift
	for f in core __init__.py __main__.py cli.py; do ln -s ../../../edgeshift/$$f build/typecheck/edgeshift/$$f; done
	for p in $(PACKAGES); do ln -s ../../../$$p build/typecheck/edgeshift/$$p; done
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p edgeshift
	cd build/typecheck && MYPYPATH=. ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml ../../tests ../../benchmarks

# The whole pipeline (configs/demo.toml) on generated data, or DATA=path ARCH=name OUT=dir.
DATA ?= generated
ARCH ?= resnet20
OUT ?= out/demo
demo: $(STAMP)
	$(VENV)/bin/edgeshift pipeline configs/demo.toml --data $(DATA) --arch $(ARCH) --out $(OUT)

# The device side installed from the wheel on an emulated Raspberry Pi 4 (cortex-a72) and 5 (cortex-a76), under
# Debian's arm64 Python 3.11 (bookworm) and 3.13 (trixie), every answer compared with this machine's
# (tests/emulated_pi/check.py). Downloads are kept in build/emulated-pi. ONNXRUNTIME=1.21.0 pins a version.
ONNXRUNTIME ?=
pi-check: $(STAMP)
	$(PY) tests/emulated_pi/check.py $(if $(ONNXRUNTIME),--onnxruntime $(ONNXRUNTIME))

# The same check over onnxruntime versions, as a table (BENCHMARKS.md).
ORT_VERSIONS ?= 1.16.0,1.19.2,1.20.0,1.20.1,1.21.0,1.21.1,1.22.0,1.31.1
pi-matrix: $(STAMP)
	$(PY) tests/emulated_pi/check.py --matrix $(ORT_VERSIONS)

# A long random run of the generated-CNN property test (tests/test_generated_cnns.py; CI runs a bounded,
# derandomized one). Failures are shrunk to the smallest architecture, printed, and kept in .hypothesis/ so the
# next run tries them first; turn each into a named test. EXAMPLES=N architectures (default 1000, ~5 min).
EXAMPLES ?= 1000
fuzz: $(STAMP)
	EDGESHIFT_FUZZ=fuzz EDGESHIFT_FUZZ_EXAMPLES=$(EXAMPLES) $(PY) -m pytest tests/test_generated_cnns.py -s -k random

clean:
	rm -rf $(VENV) .pytest_cache
