# vitscale: two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The stamp changes when pyproject.toml does, so a second `make setup` takes seconds.
STAMP := $(VENV)/.setup-$(shell sha1sum pyproject.toml 2>/dev/null | cut -c1-12)
export DS_ACCELERATOR ?= cpu
export MLFLOW_DISABLE_TELEMETRY ?= true
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup fmnist demo docs-check test test-multinode bench clean
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
setup: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first (CUDA build on x86_64; runs on CPU too); DeepSpeed builds against it.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	# Prebuild DeepSpeed's shared-memory comm op so the first launch does not JIT-compile it.
	DS_BUILD_SHM_COMM=1 $(PIP) install -q --no-build-isolation deepspeed==0.19.8
	$(PIP) install -q -e '.[dev]'
	# foolbox ships 20 real ImageNet JPEGs + CIFAR PNGs used by the tests; we only read its files.
	$(PIP) install -q --no-deps foolbox==3.3.4
	rm -f $(VENV)/.setup-*; touch $@

# Real demo data (Debian package, MIT licence): installed only when missing.
fmnist:
	@if [ -f $(FMNIST) ]; then :; \
	 elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	 elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	 else echo "Fashion-MNIST missing and no root: apt-get install dataset-fashion-mnist"; exit 1; fi

demo: setup fmnist
	bash scripts/demo.sh

# The README's after-demo commands, in order, on the demo's outputs (run `make demo` first).
docs-check: setup
	bash scripts/docs_check.sh

test: setup
	@[ "$$(id -u)" != 0 ] || $(MAKE) --no-print-directory fmnist
	$(VENV)/bin/pytest -q tests --ignore=tests/multinode
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory test-multinode; \
	 else echo "SKIPPED test-multinode: needs root to create network namespaces"; fi

test-multinode: setup
	@if [ -d tests/multinode ]; then $(VENV)/bin/pytest -q tests/multinode; \
	 else echo "no multinode suite yet"; fi

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf demo_work outputs mlruns mlflow.db mlartifacts
