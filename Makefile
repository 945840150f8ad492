# adabatch-hvd: `make train` runs the main job, `make test` runs every test, `make test-fast` the fast ones
# (no cluster, no Horovod job of several ranks, no build: the markers in pytest.ini); all set up first.
SHELL := /bin/bash
PY := .venv/bin/python
NP ?= 2
RUN_DIR ?= runs/fashion_mnist-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup train test test-fast bench bench-quick docker-check clean

setup:
	@./launch/setup.sh

train: setup
	@./launch/run-local.sh $(NP) --config configs/fashion_mnist.yaml --run-dir $(RUN_DIR)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) benchmarks/bench.py

bench-quick: setup
	$(PY) benchmarks/bench.py --quick --out runs/bench-quick

# Builds the CPU image and runs it: entrypoint forms, two containers, a killed worker (tests/docker_check.sh).
docker-check:
	@./tests/docker_check.sh

clean:
	rm -rf runs .pytest_cache .hypothesis
