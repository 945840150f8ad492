# adabatch-hvd: `make train` runs the main job, `make test` runs the tests; both set up first.
SHELL := /bin/bash
PY := .venv/bin/python
NP ?= 2
RUN_DIR ?= runs/fashion_mnist-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup train test bench bench-quick docker-check clean

setup:
	@./launch/setup.sh

train: setup
	@./launch/run-local.sh $(NP) --config configs/fashion_mnist.yaml --run-dir $(RUN_DIR)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench.py

bench-quick: setup
	$(PY) benchmarks/bench.py --quick --out runs/bench-quick

# Builds the CPU image and runs it: entrypoint forms, two containers, a killed worker (tests/docker_check.sh).
docker-check:
	@./tests/docker_check.sh

clean:
	rm -rf runs .pytest_cache .hypothesis
