# Two commands on a fresh machine: `make serve` (the main job) and `make test` (the test suite).
# Each creates .venv and installs the project. llama-cpp-python builds from its sdist once, with Tandem's
# patch to the vendored llama.cpp (patches/), about 7-12 min on 2 cores; the wheel is kept in
# ~/.cache/tandem/wheels for later installs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF

.PHONY: serve test install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

LLAMA_CPP_PYTHON := 0.3.36
LLAMA_PATCH := patches/llama-cpp-python.patch

$(VENV)/.llama: $(LLAMA_PATCH) patches/build.py | $(BIN)/python
	$(BIN)/python patches/build.py $(LLAMA_CPP_PYTHON) $(LLAMA_PATCH)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.llama | $(BIN)/python
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
