# Two commands on a fresh machine: `make serve` (the main job) and `make test` (the test suite).
# Each creates .venv and installs the project; llama-cpp-python builds from source once (~12 min on
# 2 cores) and pip caches the wheel for later runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF

.PHONY: serve test install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/tandem serve $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/tandem bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
