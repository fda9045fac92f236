# Everything a fresh machine needs: `make test` and `make serve` set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: install test lint format serve bench proto clean

install: $(STAMP)

# torch first and pinned: a bare `torch` requirement would pull several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q

serve: install
	$(BIN)/rdn-serve $(SERVE_ARGS)

bench: install
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

proto: install
	$(BIN)/python -m server.protogen

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
