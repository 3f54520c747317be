# Hearth: `make run` serves the OpenAI API on 127.0.0.1:8080; `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODELS_DIR ?= models
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: run test test-tools lint format protos models bench image-recipe clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The CPU build of torch, pinned, before anything that pulls torch in (any other version means
# a multi-GB CUDA download).
TORCH ?= torch==2.13.0
EXTRAS ?= llama,transformers,whisper,diffusers

# Reinstall when pyproject.toml changes. llama-cpp-python compiles once (4-5 min on 2 cores);
# pip's wheel cache makes later installs fast.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install '$(TORCH)'
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install '$(TORCH)'
	$(BIN)/python -m pip install -e '.[$(EXTRAS),test]'
	touch $@ $(VENV)/.installed-run

DEFAULT_MODELS ?= smollm2-135m-instruct all-minilm-l6-v2 whisper-base

models: $(VENV)/.installed-run
	$(BIN)/hearth models install --models-dir $(MODELS_DIR) $(DEFAULT_MODELS)

run: $(VENV)/.installed-run models
	$(BIN)/hearth run --host $(HOST) --port $(PORT) --models-dir $(MODELS_DIR)

lint: $(VENV)/.installed-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# Speech for the whisper tests (espeak-ng speaks, sox converts). Where they cannot be installed
# the tests that need them are skipped, and say why.
test-tools:
	@if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq espeak-ng sox libsox-fmt-all >/dev/null; \
	  fi; \
	fi; command -v espeak-ng >/dev/null || echo "note: no espeak-ng: speech tests will be skipped"

test: lint test-tools
	$(BIN)/python -m pytest
	@if [ -n "$${CI:-}" ]; then $(MAKE) --no-print-directory image-recipe; \
	 else echo "(the Docker image's install recipe runs in CI; locally: make image-recipe)"; fi

# The Docker image's install steps on a clean venv, then a smoke run of what they installed.
RECIPE_VENV ?= /tmp/hearth-image-venv
image-recipe:
	rm -rf $(RECIPE_VENV)
	PIP_NO_CACHE=1 docker/install.sh $(RECIPE_VENV)
	docker/smoke.sh $(RECIPE_VENV)
	rm -rf $(RECIPE_VENV)

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

protos: $(VENV)/.installed-test
	$(BIN)/python -m protos.generate

bench: $(VENV)/.installed-test models
	$(BIN)/python bench/stream_overhead.py --models-dir $(MODELS_DIR)

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache *.egg-info
