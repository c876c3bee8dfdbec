# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo venv clean

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

# ruff (lint + format) and mypy on the device side and the bottom layer. mypy reads them through a tree of links
# named as the installed package (build/typecheck/edgeshift/...), since the folders install under other names.
DEVICE_SIDE := edgeshift runtime device_profiles
lint: $(STAMP)
	$(VENV)/bin/ruff check $(DEVICE_SIDE)
	$(VENV)/bin/ruff format --check $(DEVICE_SIDE)
	rm -rf build/typecheck && mkdir -p build/typecheck/edgeshift
	for f in core __init__.py __main__.py cli.py; do ln -s ../../../edgeshift/$$f build/typecheck/edgeshift/$$f; done
	ln -s ../../../runtime build/typecheck/edgeshift/runtime
	ln -s ../../../device_profiles build/typecheck/edgeshift/device_profiles
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p edgeshift.core \
		-p edgeshift.runtime -p edgeshift.device_profiles -m edgeshift -m edgeshift.cli

# The whole pipeline (configs/demo.toml) on generated data, or DATA=path ARCH=name OUT=dir.
DATA ?= generated
ARCH ?= resnet20
OUT ?= out/demo
demo: $(STAMP)
	$(VENV)/bin/edgeshift pipeline configs/demo.toml --data $(DATA) --arch $(ARCH) --out $(OUT)

clean:
	rm -rf $(VENV) .pytest_cache
