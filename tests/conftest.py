"""Shared fixtures and the ``cuda`` marker. Real-data tests read the raw datasets from $RAW_DIR (default:
../shared/data). Shared test code (the Snakemake runner, the tiny configs and models) is in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.paths import ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``@pytest.mark.cuda`` where there is no CUDA GPU (torch is imported only for them)."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
        for item in marked:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def raw_dir() -> Path:
    """The real datasets. Missing data is an error, not a skip: CI always has them."""
    path = Path(os.environ.get("RAW_DIR", ROOT.parent / "shared" / "data")).resolve()
    if not (path / "sst2" / "train.tsv").is_file():
        pytest.fail(f"real datasets not found in {path}; set RAW_DIR to the folder holding sst2/, ag_news/, ...")
    return path


@pytest.fixture(scope="session")
def paper_config_path() -> Path:
    return ROOT / "config" / "config.yaml"
