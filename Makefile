# Two commands from a fresh clone (Python 3.11 + pip):
#   make demo   synthetic data -> prepare -> train -> evaluate -> export -> serve -> recommend
#   make test   the test suite
# Each creates its own virtual environment in .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
PORT   ?= 8500

.PHONY: demo test bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test,jax]"
	touch $@ $(VENV)/.installed-run

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

demo: $(VENV)/.installed-run
	TF_CPP_MIN_LOG_LEVEL=3 PATH="$(CURDIR)/$(BIN):$$PATH" bash demo.sh $(DEMO) $(PORT)

bench: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks.all

bench-quick: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks.all --quick

clean:
	rm -rf $(DEMO) .pytest_cache
