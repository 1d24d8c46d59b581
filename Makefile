# mlxgpt — common tasks. `make install` then `make test`.
PYTHON ?= python3
VENV ?= .venv
# the Linux MLX backend: cpu, or cuda / cuda13 for NVIDIA (`make install EXTRAS=cuda`); ignored on macOS
EXTRAS ?= cpu
BIN := $(VENV)/bin
PY := $(BIN)/python
comma := ,
PIP_EXTRAS := dev$(if $(EXTRAS),$(comma)$(EXTRAS),)

.PHONY: help install test test-fast test-hf train sample compare study-lr-depth bench bench-blas bench-prepare bench-sample clean

help:  ## this list
	@awk -F ':.*## ' '/^[a-z-]+:.*## /{printf "%-16s%s\n", $$1, $$2}' $(MAKEFILE_LIST)

install:  ## virtual environment + project + dependencies + fast CPU BLAS (Linux)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(PIP_EXTRAS)]"
	$(PY) -m mlxgpt.setup_blas --setup

test:  ## the whole suite
	$(PY) -m pytest -q

test-fast:  ## unit tests only (no end-to-end subprocess runs)
	$(PY) -m pytest -q -m "not slow"

test-hf:  ## installs the hf extra (transformers, torch), then the tests that load exports and checkpoints with them
	$(PY) -m pip install --quiet -e ".[$(PIP_EXTRAS),hf]"
	$(PY) -m pytest -q tests/test_pretrained.py

train:  ## the default job: embedded dataset, small model, offline
	$(PY) train.py $(ARGS)

sample:  ## e.g. make sample ARGS="checkpoint=logs/runs/<run> 'prompt=\"def \"'" (quoted so the space survives)
	$(PY) sample.py $(ARGS)

bench:  ## training speed: ours vs a bare compiled MLX step vs nanoGPT (NANOGPT_DIR=<checkout>, torch installed)
	$(PY) bench.py $(ARGS)

bench-blas:  ## reference BLAS vs OpenBLAS matmul, side by side
	$(PY) -m mlxgpt.setup_blas --bench

clean:  ## build and test leftovers (caches, __pycache__, egg-info, build/, dist/); never logs/ (runs, checkpoints) or data/
	rm -rf .pytest_cache .hypothesis build dist *.egg-info src/*.egg-info
	find . \( -path ./$(VENV) -o -path ./.git -o -path ./logs -o -path ./data \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

bench-sample:  ## greedy sampling speed with and without the KV cache (tokens must match)
	$(PY) -m mlxgpt.bench_sample $(ARGS)

bench-prepare:  ## data prepare throughput and peak memory vs a nanoGPT-style datasets.map + memmap, side by side
	$(PY) -m mlxgpt.bench_prepare $(ARGS)

compare:  ## table + plots of runs: make compare RUNS=logs/multiruns/<sweep> [OUT=dir]
	@test -n "$(RUNS)" || { echo "error: no runs given; make compare RUNS=logs/multiruns/<sweep> [OUT=dir]" >&2; exit 2; }
	$(PY) compare.py $(RUNS) $(if $(OUT),--out $(OUT))

STUDY_BUDGET = trainer.max_iters=300 trainer.eval_interval=50 trainer.eval_iters=10 schedule.warmup_iters=30 \
	callbacks.sample.max_new_tokens=100

study-lr-depth:  ## experiments/lr_depth: 3x3 lr x depth sweep on CPU, its follow-up at larger lr, table and plots
	$(eval SWEEP_DIR := logs/multiruns/lr_depth_$(shell date +%Y-%m-%d_%H-%M-%S))
	$(PY) train.py -m sweep=lr_depth $(STUDY_BUDGET) hydra.sweep.dir=$(SWEEP_DIR)
	$(PY) train.py -m sweep=lr_depth optimizer.lr=1e-2,3e-2 $(STUDY_BUDGET) hydra.sweep.dir=$(SWEEP_DIR)_followup
	$(PY) compare.py $(SWEEP_DIR) $(SWEEP_DIR)_followup --out experiments/lr_depth
