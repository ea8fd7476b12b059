# condense: `make demo` and `make test` set everything up on a fresh machine with Python 3.11.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install condense with its dev tools

demo: $(STAMP) ## run the embedded default end to end and print the funnel
	$(BIN)/condense demo --run-dir runs/demo

test: $(STAMP) ## run the test suite (real Ray, real faiss, real files)
	$(BIN)/python -m pytest -q

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## ruff format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) ## cluster stage vs bare faiss on 1M x 768 rows (takes ~10 min)
	$(BIN)/python bench/bench_cluster.py

clean: ## remove runs, caches and the venv
	rm -rf runs .pytest_cache .ruff_cache $(VENV)

.PHONY: help install demo test lint format bench clean
