"""carlrar: CARL and RAR (Qiu et al., Findings of ACL 2021), FreeLB, and k-PGD attacks for text classifiers.

The library is usable on its own in any PyTorch training loop; the ``carlrar`` command and the Snakemake
workflow are built on it. The names below are imported on first use, so ``carlrar --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "carlrar.models",
    "TextClassifier": "carlrar.models",
    "ClassifierOutput": "carlrar.models",
    "FreeLBConfig": "carlrar.config",
    "AnalysisConfig": "carlrar.config",
    "FreeLB": "carlrar.adversary",
    "Batch": "carlrar.adversary",
    "adversarial_backward": "carlrar.adversary",
    "parameters_of": "carlrar.adversary",
    "CARLLoss": "carlrar.contrastive",
    "CARLObjective": "carlrar.contrastive",
    "RARObjective": "carlrar.reconstruction",
    "build_reconstructor": "carlrar.reconstruction",
    "pgd_attack": "carlrar.attacks",
    "keep_host_memory": "carlrar.host_memory",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'carlrar' has no attribute {name!r}")
