# Set-up and entry points. `make test` and `make demo` each create or reuse .venv and install what they need.
# TORCH_SPEC pins the torch pair this project is tested with; a GPU machine may override it, e.g.
#   make test TORCH_SPEC="torch torchvision"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.engram-vision-installed

.PHONY: install test demo demo64 lint clean

install: $(STAMP)

# Reinstall when the dependency list changes; torch first so pip never swaps in another build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m study demo

# the 64-token study: 8x8 tokens per digit, 3 seeds of the baseline and of Engram rho 0.5 (about 30 min)
demo64: $(STAMP)
	$(PY) -m study demo --setup digits64

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf runs lightning_logs
