"""Tiny random models: a 2-layer, 32-wide encoder (``load_model(name, num_labels, overrides)``'s overrides)."""

from __future__ import annotations

from helpers.paths import SHARED

RANDOM_MINILM = "random:minilm-l6"  # all-MiniLM-L6-v2's config and tokenizer, random weights
RANDOM_ALBERT = f"random:{SHARED / 'albert'}"  # albert-base-v2's config and tokenizer, random weights
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_ALBERT = {**TINY_BERT, "embedding_size": 16}
