# Two commands from a fresh clone (Python 3.11 + pip):
#   make demo   synthetic data -> prepare -> train -> evaluate -> export -> serve -> recommend
#   make test   the test suite
#   make protos          regenerate sasrec/v1/recommender_pb2*.py(i) from protos/ (after editing the .proto)
#   make client-wheel    dist/sasrec_service_client-*.whl: the Python client alone, without TensorFlow
# Each creates its own virtual environment in .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
PORT   ?= 8500

.PHONY: demo test bench bench-quick protos client-wheel clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test,jax]"
	touch $@ $(VENV)/.installed-run

# Two workers, one test file each at a time (module fixtures built once per file): waits and process starts overlap.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

demo: $(VENV)/.installed-run
	TF_CPP_MIN_LOG_LEVEL=3 PATH="$(CURDIR)/$(BIN):$$PATH" bash demo.sh $(DEMO) $(PORT)

bench: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks.all

bench-quick: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks.all --quick

# grpcio-tools comes with the test extra. tests/serving/test_proto.py checks the committed output is current.
protos: $(VENV)/.installed-test
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. \
		protos/sasrec/v1/recommender.proto

# clients/python builds in its own build/ folder, which setuptools never empties: a file left there by an
# earlier build would end up in the wheel.
client-wheel: | $(BIN)/python
	rm -rf clients/python/build
	$(BIN)/pip wheel -q --no-deps clients/python -w dist

clean:
	rm -rf $(DEMO) .pytest_cache
