"""The names everything else reads: the datasets and methods, their display names, table order, and which
regularisers each method adds.

One place, imported by the config (schema enums are checked against it by a test), the CLI's choices, the
tables, the hyperparameter search, method construction and the workflow. Pure Python, so the workflow can read
it while parsing, before any heavy dependency is importable. Each dataset's files and label set are described
in ``carlrar.data.DATASETS`` (same ids).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """A training method: FreeLB's K adversarial passes, plus CARL's and/or RAR's term."""

    display: str
    adversarial: bool  # FreeLB's perturbation passes (all but base)
    contrastive: bool  # CARL's L_D (carlrar.contrastive)
    reconstruction: bool  # RAR's L_R (carlrar.reconstruction)


# In the paper's table order.
METHODS: dict[str, Method] = {
    "base": Method("Base (fine-tuning)", adversarial=False, contrastive=False, reconstruction=False),
    "freelb": Method("FreeLB", adversarial=True, contrastive=False, reconstruction=False),
    "carl": Method("CARL", adversarial=True, contrastive=True, reconstruction=False),
    "rar": Method("RAR", adversarial=True, contrastive=False, reconstruction=True),
    "carl_rar": Method("CARL+RAR", adversarial=True, contrastive=True, reconstruction=True),
}
METHOD_IDS = tuple(METHODS)
CONTRASTIVE_METHODS = tuple(m for m, info in METHODS.items() if info.contrastive)
RECONSTRUCTION_METHODS = tuple(m for m, info in METHODS.items() if info.reconstruction)

# Dataset ids -> display names, in the paper's table order (Table 2's columns).
DATASETS: dict[str, str] = {
    "sst2": "SST-2",
    "yahoo_answers": "Yahoo! Answers",
    "yelp_polarity": "Yelp-P",
    "ag_news": "AG's News",
}
DATASET_IDS = tuple(DATASETS)


def method_display(method: str) -> str:
    return METHODS[method].display if method in METHODS else method


def dataset_display(dataset: str) -> str:
    return DATASETS.get(dataset, dataset)
