"""Shared fixtures and the ``cuda`` marker. Shared test code (the Snakemake runner, the tiny configs and models) is in
tests/helpers/.

Raw data: ``raw_dir`` is tests/fixtures/raw, a few dozen invented rows per dataset in the official file formats,
committed, so the suite runs in a fresh clone; the smoke config samples from it. ``real_raw_dir`` is the real
datasets in $RAW_DIR (default ../shared/data): the tests that need them skip, naming the folder, where it lacks
them, and fail instead when $CARLRAR_REQUIRE_REAL_DATA is 1 (CI sets it, so they can never silently stop running
there)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.paths import FIXTURE_RAW, ROOT

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


REQUIRE_REAL_DATA = "CARLRAR_REQUIRE_REAL_DATA"
# What the real-data tests read: the project's copies of the datasets (../shared/data/README.md)
REAL_FILES = (
    "sst2/train.tsv",
    "sst2/dev.tsv",
    "ag_news/test.csv",
    "ag_news/train_partial.csv",
    "yelp_polarity/train_head200.csv",
    "yelp_polarity/test_head20.csv",
    "yahoo_answers/sample_10class.csv",
)


@pytest.fixture(scope="session")
def raw_dir() -> Path:
    """Raw files in each dataset's official format, small enough to commit and large enough for config/smoke.yaml."""
    return FIXTURE_RAW


@pytest.fixture(scope="session")
def real_raw_dir() -> Path:
    """The real datasets: a skip naming what is missing, or an error where $CARLRAR_REQUIRE_REAL_DATA is 1."""
    path = Path(os.environ.get("RAW_DIR", ROOT.parent / "shared" / "data")).resolve()
    missing = [name for name in REAL_FILES if not (path / name).is_file()]
    if missing:
        message = f"real datasets not found: {path} lacks {', '.join(missing)}; set RAW_DIR to the folder holding them"
        if os.environ.get(REQUIRE_REAL_DATA) == "1":
            pytest.fail(f"{message} ({REQUIRE_REAL_DATA}=1: missing real data is an error)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def paper_config_path() -> Path:
    return ROOT / "config" / "config.yaml"
