# Set-up and everyday targets. `make demo` and `make test` work on a fresh machine: they create
# .venv, install a pinned CPU build of torch, the package (building its C++ extension) and what
# the target needs, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Pinned so pip takes the CPU wheel; the package itself accepts a range (see pyproject.toml).
TORCH_PIN ?= torch==2.13.0
PKG_SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: demo test test-fast bench lint format clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_PIN)"
	touch $@

$(VENV)/.core: $(VENV)/.torch $(PKG_SOURCES)
	$(PIP) install -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) install -e ".[test,triton,plots,lint,eval]" "$(TORCH_PIN)"
	touch $@

demo: $(VENV)/.core
	$(PY) -m fusion_kernels.merge --demo --overwrite  # a rerun replaces its own earlier demo

test: $(VENV)/.test
	TRITON_INTERPRET=1 $(PY) -m pytest -q

test-fast: $(VENV)/.test
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.test
	$(PY) -m pytest bench -q --benchmark-only --benchmark-columns=min,mean,rounds

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info fusion_kernels/_cpp*.so fusion_demo
