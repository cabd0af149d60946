# fgq-jax: `make install` then `make test`. See README.md.
PY ?= .venv/bin/python
SHARED ?= ../shared

.PHONY: install test sweep sweep-full bench gpu-check clean

install:
	python3 -m venv .venv
	.venv/bin/pip install --upgrade pip
	.venv/bin/pip install -r requirements.txt
	.venv/bin/pip install -e . --no-deps

test:
	$(PY) -m pytest -q tests

sweep:
	$(PY) -m experiments.sweep --config experiments/configs/sweep_resnet20.py

bench:
	$(PY) -m benchmarks.run_all

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf .cache .pytest_cache
