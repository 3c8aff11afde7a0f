"""The names everything else reads: the datasets and methods, their display names, table order, and the parts
(regularisers) each method adds, with the config sections and modules of each part.

One place, imported by the config (schema enums are checked against it by a test), the CLI's choices, the
tables, the hyperparameter search, method construction and the workflow. Pure Python, so the workflow can read
it while parsing, before any heavy dependency is importable. Each dataset's files and label set are described
in ``carlrar.data.DATASETS`` (same ids).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """One ingredient of a method: the config sections it reads and the modules that implement it.

    What a run depends on is derived from its method's parts, so that a setting or a module of one part reruns
    only the methods that have it (carlrar.fingerprints): ``training_section`` is a key under ``training``,
    ``dataset_section`` a key under ``datasets.<name>``, ``modules`` are files of this package.
    """

    training_section: str | None
    dataset_section: str | None
    modules: tuple[str, ...]


PARTS: dict[str, Part] = {
    # FreeLB's K perturbation passes, with each dataset's values (carlrar.adversary)
    "freelb": Part(training_section=None, dataset_section="freelb", modules=("adversary.py",)),
    # CARL's L_D: the loss and its memory banks (training.carl), the per-dataset schedule and negatives
    "carl": Part(training_section="carl", dataset_section="carl", modules=("contrastive.py",)),
    # RAR's L_R and its reconstructor warm-up (training.rar holds both)
    "rar": Part(training_section="rar", dataset_section=None, modules=("reconstruction.py", "rar_warmup.py")),
}


@dataclass(frozen=True)
class Method:
    """A training method: fine-tuning plus the parts it adds (FreeLB's passes, CARL's and/or RAR's term)."""

    display: str
    parts: tuple[str, ...]

    @property
    def adversarial(self) -> bool:  # FreeLB's perturbation passes (all but base)
        return "freelb" in self.parts

    @property
    def contrastive(self) -> bool:  # CARL's L_D (carlrar.contrastive)
        return "carl" in self.parts

    @property
    def reconstruction(self) -> bool:  # RAR's L_R (carlrar.reconstruction)
        return "rar" in self.parts


# In the paper's table order.
METHODS: dict[str, Method] = {
    "base": Method("Base (fine-tuning)", parts=()),
    "freelb": Method("FreeLB", parts=("freelb",)),
    "carl": Method("CARL", parts=("freelb", "carl")),
    "rar": Method("RAR", parts=("freelb", "rar")),
    "carl_rar": Method("CARL+RAR", parts=("freelb", "carl", "rar")),
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
