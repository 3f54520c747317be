# Hearth: `make run` serves the OpenAI API on 127.0.0.1:8080; `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODELS_DIR ?= models
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: run run-tools test test-tools lint format protos models bench image image-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The backends to install: EXTRAS=llama is the slim mode (chat, completions and embeddings on
# llama.cpp; no torch). torch, pinned, goes in first where a backend needs it: the CPU build from
# PyTorch's CPU index on a machine without an NVIDIA GPU, TORCH_BUILD=cuda for PyPI's CUDA build
# (docker/install-torch.sh says which it installs).
TORCH ?= torch==2.13.0
EXTRAS ?= llama,transformers,whisper,diffusers,tts,convert
comma := ,
EXTRA_LIST := $(subst $(comma), ,$(EXTRAS))
NEEDS_TORCH := $(filter transformers diffusers all,$(EXTRA_LIST))

TORCH_BUILD ?= auto
export TORCH_BUILD
# What was asked for (the backends, the torch build): asking for something else reinstalls.
CHOICE := $(VENV)/.choice-$(subst $(comma),-,$(EXTRAS))-torch-$(TORCH_BUILD)
$(CHOICE): | $(BIN)/python
	rm -f $(VENV)/.choice-*
	touch $@

# Reinstall when pyproject.toml or the choice changes. llama-cpp-python compiles once (4-5 min on
# 2 cores); pip's wheel cache makes later installs fast.
$(VENV)/.installed-run: pyproject.toml $(CHOICE) | $(BIN)/python
	$(if $(NEEDS_TORCH),docker/install-torch.sh $(BIN)/python '$(TORCH)')
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	touch $@

# The tests also install Ray, to test the Ray placer (its tests are skipped where it is absent).
$(VENV)/.installed-test: pyproject.toml $(CHOICE) | $(BIN)/python
	$(if $(NEEDS_TORCH),docker/install-torch.sh $(BIN)/python '$(TORCH)')
	$(BIN)/python -m pip install -e '.[$(EXTRAS),ray,test]'
	touch $@ $(VENV)/.installed-run

# The chat model; the embedding, transcription and voice models where their backends are
# installed.
DEFAULT_MODELS ?= smollm2-135m-instruct \
  $(if $(filter transformers all,$(EXTRA_LIST)),all-minilm-l6-v2) \
  $(if $(filter whisper all,$(EXTRA_LIST)),whisper-base) \
  $(if $(filter tts all,$(EXTRA_LIST)),joe-us-piper)

models: $(VENV)/.installed-run
	$(BIN)/hearth models install --models-dir $(MODELS_DIR) $(DEFAULT_MODELS)

# Piper voices (EXTRAS with tts) read their phonemes from the espeak-ng program: installed with
# apt where it can be, else the voice refuses to load and says so.
run-tools:
	@if [ -n "$(filter tts all,$(EXTRA_LIST))" ] && ! command -v espeak-ng >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; \
	  else echo "note: no espeak-ng: install it (apt-get install espeak-ng) for text to speech"; fi; \
	fi

run: $(VENV)/.installed-run models run-tools
	$(BIN)/hearth run --host $(HOST) --port $(PORT) --models-dir $(MODELS_DIR)

lint: $(VENV)/.installed-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# Speech for the whisper tests (espeak-ng speaks, sox converts) and Chromium for the web UI's
# tests (driven by Playwright). Where they cannot be installed the tests that need them are
# skipped, and say why.
TEST_PACKAGES := espeak-ng sox libsox-fmt-all chromium fonts-dejavu-core
test-tools:
	@if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null \
	    || ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_PACKAGES) >/dev/null; \
	  fi; \
	fi; \
	command -v espeak-ng >/dev/null || echo "note: no espeak-ng: speech tests will be skipped"; \
	command -v chromium >/dev/null || echo "note: no chromium: the web UI's tests will be skipped"

test: lint test-tools
	$(BIN)/python -m pytest

# The Docker images (docker/Dockerfile): $(IMAGE):latest with every backend, $(IMAGE):llama the
# slim one. `make image-test` builds both and runs each as a home server would
# (docker/smoke-image.sh); .ci/run does both in CI.
IMAGE ?= hearth
image:
	docker/build-images.sh $(IMAGE)

image-test: image
	docker/smoke-image.sh $(IMAGE):llama llama
	docker/smoke-image.sh $(IMAGE):latest full

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

protos: $(VENV)/.installed-test
	$(BIN)/python -m protos.generate

bench: $(VENV)/.installed-test models
	$(BIN)/python bench/stream_overhead.py --models-dir $(MODELS_DIR)

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache *.egg-info
