"""The tests' configs, all built from one source: ``config/smoke.yaml`` with per-test overrides deep-merged in.

``smoke_config()`` is the file itself; ``tiny_config()`` is the unit tests' training config: smoke.yaml with
``TINY`` merged in (every SST-2 sentence of a test's own small raw files, 16 tokens, data seed 3, 3 epochs at a
learning rate of 3e-3, CARL from epoch 1 with 5 negatives).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import yaml

from helpers.paths import ROOT

SMOKE_YAML = ROOT / "config" / "smoke.yaml"

# What tiny_config() changes in smoke.yaml. run_name, raw_dir, seeds and methods are the schema's defaults
# (tests pass their own data and run folders); the model (tiny MiniLM), eval_every, eval_batch_size, the SST-2
# dev source, evaluate, batch_size and FreeLB's values are smoke.yaml's.
TINY: dict[str, Any] = {
    "run_name": "t",
    "raw_dir": "data/raw",
    "data": {"seed": 3, "max_length": 16},
    "training": {
        "seeds": [1, 2, 3],
        "methods": ["base", "freelb", "carl", "rar"],
        "learning_rate": 3e-3,
        "epochs": 3,
    },
    "datasets": {"sst2": {"per_class": {"train": "all", "dev": "all"}, "carl": {"start_epoch": 1, "negatives": 5}}},
}


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into ``base`` in place: mappings merge key by key, anything else replaces."""
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def smoke_config(*overrides: Mapping[str, Any]) -> dict[str, Any]:
    """config/smoke.yaml as a fresh mapping, with each of ``overrides`` deep-merged in, in order."""
    config = yaml.safe_load(SMOKE_YAML.read_text(encoding="utf-8"))
    for override in overrides:
        deep_merge(config, override)
    return config


def tiny_config(*overrides: Mapping[str, Any], **training: Any) -> dict[str, Any]:
    """The unit tests' tiny SST-2 config: smoke.yaml + ``TINY`` + ``overrides``; ``training`` sets training keys."""
    return smoke_config(TINY, *overrides, {"training": training})
