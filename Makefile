# Two entry points for a newcomer (README): `make repro` and `make test`.
# PyTorch is installed first, on its own: a bare `torch` requirement could pull a multi-GB CUDA build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup repro test lint format rehearsal rehearsal-clean gpu-bench gpu-bench-toy

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/activate
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"

repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# One thread per process: the suite runs torchrun pairs and DVC subprocesses on small CPUs.
# TEST_WORKERS pytest processes (pytest-xdist), whole files each: module fixtures built once.
TEST_WORKERS ?= 2
test: setup
	OMP_NUM_THREADS=1 PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q \
		-n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The SD-2.1 rehearsal (not in CI: ~9 min on 2 cores, +1 min the first time, 2.5 GB of random weights cached in
# .rehearsal/): DIFF's recipe on the real architecture through real `dvc repro`, scaled down.
rehearsal: setup
	OMP_NUM_THREADS=2 PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tests/rehearsal.py

# The clean recipe (recipes/cleandift-gta2cs.yaml) the same way: one clean store, no inversion,
# a CleanDIFT-layout UNet file of random weights (1.7 GB more in .rehearsal/).
rehearsal-clean: setup
	OMP_NUM_THREADS=2 PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tests/rehearsal.py --recipe cleandift-gta2cs

# The GPU measurements in one run (~10 min on one H100; docs/scale.md): extraction passes/s at
# 512x512 bf16 per batch, DIFF's online iteration beside the cached head step, the loader from
# local disk, a two-rank NCCL step on a two-GPU host. Writes benchmarks/results/gpu_bench.json.
# Install a CUDA build of PyTorch first (`make TORCH=torch setup`). Not in CI.
gpu-bench: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/gpu_bench.py

# The same parts on the CPU at toy size, the script's own checks included (~3 min): how the GPU
# benchmark is tested without a GPU. Not in CI.
gpu-bench-toy: setup
	OMP_NUM_THREADS=2 PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/gpu_bench.py --toy \
		--out .bench/gpu_bench_toy.json
