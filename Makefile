# fgq-jax: `make install` then `make test`. See README.md.
PY ?= .venv/bin/python
SHARED ?= ../shared
# Extra sweep arguments, e.g. SWEEP_ARGS="--out /tmp/fresh" to recompute into an empty results root
# (in the repository's own results/ the committed points are found finished and skipped).
SWEEP_ARGS ?=

.PHONY: install test sweep sweep-full bench gpu-check clean

install:
	python3 -m venv .venv
	.venv/bin/pip install --upgrade pip
	.venv/bin/pip install -r requirements.txt
	.venv/bin/pip install -e . --no-deps

test:
	$(PY) -m pytest -q tests

sweep:
	$(PY) -m experiments.sweep --config experiments/configs/sweep_resnet20.py $(SWEEP_ARGS)

sweep-full:
	$(PY) -m experiments.sweep --config experiments/configs/full_grid_resnet20.py $(SWEEP_ARGS)

bench:
	$(PY) -m benchmarks.run_all

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf .cache .pytest_cache
