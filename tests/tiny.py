"""Tiny random models and a tiny training config shared by the tests (a 2-layer, 32-wide encoder)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SHARED = Path(os.environ.get("CARLRAR_SHARED", Path(__file__).parents[1].parent / "shared"))
RANDOM_ALBERT = f"random:{SHARED / 'albert'}"  # albert-base-v2's config and tokenizer, random weights
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_ALBERT = {**TINY_BERT, "embedding_size": 16}


def tiny_config(**training: Any) -> dict[str, Any]:
    """A tiny-MiniLM SST-2 config mapping; ``training`` overrides keys of its training section."""
    return {
        "run_name": "t",
        "data": {"seed": 3, "max_length": 16},
        "model": {"name": "random:minilm-l6", "overrides": TINY_BERT},
        "training": {"epochs": 3, "eval_every": 0, "eval_batch_size": 16, "learning_rate": 3e-3, **training},
        "datasets": {
            "sst2": {
                "per_class": {"train": "all", "dev": "all", "test": 0},
                "dev_source": "official",
                "evaluate": "dev",
                "batch_size": 8,
                "freelb": {"init_mag": 0.6, "adv_lr": 0.1, "adv_max_norm": 0.0, "adv_steps": 2},
                "carl": {"start_epoch": 1, "negatives": 5},
            }
        },
    }
