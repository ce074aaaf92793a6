# Two commands on a fresh machine: `make serve` (the main job) and `make test` (the test suite).
# Each creates .venv and installs the project. llama-cpp-python builds from its sdist once, with Tandem's
# patch to the vendored llama.cpp (patches/), about 7-12 min on 2 cores; the wheel is kept in
# ~/.cache/tandem/wheels for later installs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF

.PHONY: serve test install browser bench clean

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

# The model `make serve` serves: a `tandem models pull` name (fetched once into Tandem's models folder, then served
# with its default draft), or `default` for the embedded SmolLM2-135M pair (no download; quick runs).
MODEL ?= qwen2.5-coder-1.5b-instruct-q4_k_m

serve: install
	@if [ "$(MODEL)" = default ]; then $(BIN)/tandem serve $(ARGS); \
	else $(BIN)/tandem models pull $(MODEL) && $(BIN)/tandem serve --model $(MODEL) $(ARGS); fi

test: install browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# tests/test_browser.py drives the distribution's Chromium; it and the Node tests of the page's script need npm
# (which fetches axe-core for the accessibility check). Both come from apt when missing, as root or with sudo that
# needs no password; where neither works, those tests skip and say why.
browser:
	@missing="$$(command -v chromium >/dev/null || command -v chromium-browser >/dev/null || echo chromium) \
	  $$(command -v npm >/dev/null || echo npm)"; missing="$$(echo $$missing)"; [ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi; \
	if [ "$$sudo" = none ] || ! command -v apt-get >/dev/null; then \
	  echo "browser tests: $$missing missing and no apt-get as root to install it; those tests will skip"; exit 0; fi; \
	echo "installing $$missing from apt for the browser tests"; \
	($$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	  || echo "browser tests: apt-get could not install $$missing; those tests will skip"

bench: install
	$(BIN)/tandem bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
