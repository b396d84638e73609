# The two commands that matter: `make demo` (an audit on embedded defaults) and `make test`.
# Both create .venv on first use and install the locked dependencies into it (constraints.txt).
PYTHON ?= python3
VENV ?= .venv
LOCK_HASH := $(shell cat constraints.txt pyproject.toml | $(PYTHON) -c "import hashlib,sys;print(hashlib.sha1(sys.stdin.buffer.read()).hexdigest()[:12])")
STAMP := $(VENV)/.installed-$(LOCK_HASH)
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# torch on a busy 2-core machine runs several times slower with OpenMP spinning; waiting passively avoids it.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test lint bench docs clean

install: $(STAMP)

$(STAMP): constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" 
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: $(STAMP)
	$(BIN)/leap demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt torch-lucent
	$(BIN)/python benchmarks/engine_overhead.py
	$(BIN)/python benchmarks/pipeline_overhead.py
	$(BIN)/python benchmarks/tf_bridge.py

docs: $(STAMP)
	$(BIN)/python -m leapcore.config_docs > docs/config.md

clean:
	rm -rf $(VENV) leap_results mlruns.db
