# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean

venv: $(STAMP)

# Install CPU torch by its exact version first, so pip never resolves an unpinned
# torch (which would pull several GB of CUDA packages), then the project itself.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[build,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# The whole pipeline (configs/demo.toml) on generated data, or DATA=path ARCH=name OUT=dir.
DATA ?= generated
ARCH ?= resnet20
OUT ?= out/demo
demo: $(STAMP)
	$(VENV)/bin/edgeshift pipeline configs/demo.toml --data $(DATA) --arch $(ARCH) --out $(OUT)

clean:
	rm -rf $(VENV) .pytest_cache
