"""Shared fixtures. Real-data tests read the raw datasets from $RAW_DIR (default: ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


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
