# Everything a fresh machine needs: `make test` and `make serve` set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
# tritonclient pins protobuf < 7 while the server runs protobuf 7: Triton's own client and
# ModelConfig schema get an environment of their own, used by the interoperability tests.
TRITON_VENV := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed
# Debian's Chromium and its driver, for the test that drives the HTTP page in a real browser;
# where they cannot be installed (no root, no apt) that one test is skipped and says why.
BROWSER_STAMP := $(VENV)/.browser
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.PHONY: install test lint format serve bench gpu-check proto clean

install: $(STAMP) $(TRITON_STAMP) $(BROWSER_STAMP)

# torch first and pinned: a bare `torch` requirement would pull several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(TRITON_STAMP): Makefile
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install --quiet 'tritonclient[grpc,http]>=2.50'
	touch $(TRITON_STAMP)

$(BROWSER_STAMP): | $(STAMP)
	command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { $(APT_INSTALL) chromium chromium-driver >/dev/null \
	       || { apt-get update -qq && $(APT_INSTALL) chromium chromium-driver >/dev/null; }; }; } \
	  || echo "Chromium not installed: the browser test of the HTTP page will be skipped"
	touch $(BROWSER_STAMP)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint $(TRITON_STAMP) $(BROWSER_STAMP)
	RDN_TRITON_PYTHON=$(CURDIR)/$(TRITON_VENV)/bin/python $(BIN)/python -m pytest -q

serve: $(STAMP)
	$(BIN)/rdn-serve $(SERVE_ARGS)

bench: $(STAMP)
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

gpu-check: $(STAMP)
	$(BIN)/python -m tests.bench.gpu_check

proto: $(STAMP)
	$(BIN)/python -m server.protogen

clean:
	rm -rf $(VENV) $(TRITON_VENV) *.egg-info .pytest_cache .ruff_cache
