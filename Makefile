# cpt: two commands set everything up.
#   make demo   install into .venv and run the offline continual pre-training demo
#   make test   install into .venv and run the test suite
# torch is pinned to the CPU wheel by default; on a GPU machine use e.g.
#   make install TORCH_SPEC="torch>=2.4"        (or any CUDA build you already have)

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cpt-installed
PYTEST_ARGS ?=
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[all]"
	@touch $(STAMP)

demo: install
	$(VENV)/bin/cpt demo

# test files spread over the cores (pytest-xdist; a file's tests stay on one worker, with their module fixtures): one
# worker more than the cores, at most 4, because many tests spend seconds waiting on the processes they launch
# (measured on 2 cores: 2 workers kept 1.75 cores busy on average, 22-23.5 min)
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, (os.cpu_count() or 1) + 1))")
# With PYTHONDONTWRITEBYTECODE set (as on many CI and batch machines) Python caches no bytecode, and pip compiles the
# packages it installs but not an editable project: every process of the suite (each rank of each launch) compiled
# cpt's ~70 modules again, ~0.4 s of CPU each. compileall writes them once (only what changed since the last run).
test: install
	$(PY) -m compileall -q cpt tests scripts eval_harness
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
