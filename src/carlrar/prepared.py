"""Reading a prepared dataset folder: its manifest, its splits verified against it, and its content hashes.

``carlrar prepare`` (carlrar.data) writes the folder; every later step (training, the warm-up, attacks) reads
it through this module only, so none of them depends on the sampling code: an edit to carlrar.data reruns
prepare, and the steps after it only when a split's content changed. ``splits_sha256.json`` holds just the
splits' content hashes (the manifest adds provenance: source files, versions), so a re-prepare that yields the
same rows leaves it byte for byte the same, and a workflow that depends on it reruns nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from carlrar.errors import CarlrarError, first_line
from carlrar.registry import DATASET_IDS

SPLITS = ("train", "dev", "test")
MANIFEST_FILE = "manifest.json"
SPLIT_HASHES_FILE = "splits_sha256.json"


class DataError(CarlrarError):
    """Raw data that is missing, malformed or too small for the requested sample; a damaged prepared folder."""


def content_sha256(texts: list[str], labels: list[int]) -> str:
    """The hash of a split's rows (label and text, in order): what a prepared split is, whatever its file bytes."""
    digest = hashlib.sha256()
    for label, text in zip(labels, texts, strict=True):
        digest.update(json.dumps([label, text], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def split_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """Split -> content sha256, as ``splits_sha256.json`` holds them."""
    return {split: manifest["splits"][split]["sha256"] for split in SPLITS}


REPREPARE = "rerun 'carlrar prepare' for this dataset"


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """A prepared folder's manifest, checked for the keys every later step relies on; else one DataError."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: run 'carlrar prepare' for this dataset first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is damaged ({first_line(exc)}); {REPREPARE}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} is damaged ({problem}); {REPREPARE}")
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    """What is missing or malformed in a manifest, or None."""
    if not isinstance(manifest, dict):
        return "not a mapping"
    if manifest.get("dataset") not in DATASET_IDS:
        return f"unknown dataset {manifest.get('dataset')!r}"
    num_labels = manifest.get("num_labels")
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2:
        return f"num_labels {num_labels!r} is not an integer >= 2"
    if manifest.get("evaluation_split") not in ("dev", "test"):
        return f"evaluation_split {manifest.get('evaluation_split')!r} is not dev or test"
    splits = manifest.get("splits")
    for split in SPLITS:
        info = splits.get(split) if isinstance(splits, dict) else None
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("sha256"), str)
            or not isinstance(info.get("rows"), int)
        ):
            return f"splits.{split} lacks its rows and sha256"
    return None


def read_split(data_dir: str | Path, split: str, manifest: dict[str, Any]) -> pd.DataFrame:
    """Read ``<split>.parquet`` and verify it against the manifest: row count, labels and content sha256.

    The hash is the manifest's (over each row's label and text, as prepare computed it), recomputed from the rows
    actually read, so metrics.json's data hashes always describe the data a run trained and was evaluated on.
    """
    path = Path(data_dir) / f"{split}.parquet"
    try:
        frame = pd.read_parquet(path, columns=["text", "label"])
    except FileNotFoundError:
        raise DataError(f"{path} not found; {REPREPARE}") from None
    except Exception as exc:  # pyarrow raises its own types for a damaged or foreign file
        raise DataError(f"{path} is damaged or not a prepared split ({first_line(exc)}); {REPREPARE}") from None
    texts, labels = frame["text"].tolist(), frame["label"].tolist()
    expected = manifest["splits"][split]
    if len(labels) != expected["rows"]:
        raise DataError(f"{path} has {len(labels)} rows but its manifest says {expected['rows']}; {REPREPARE}")
    num_labels = manifest["num_labels"]
    if any(not isinstance(t, str) for t in texts) or any(
        not isinstance(y, int) or not 0 <= y < num_labels for y in labels
    ):
        raise DataError(f"{path} holds missing texts or labels outside 0..{num_labels - 1}; {REPREPARE}")
    if content_sha256(texts, labels) != expected["sha256"]:
        raise DataError(
            f"{path} does not match its manifest (the sha256 of its rows differs): it was changed or comes from "
            f"another prepare; {REPREPARE}"
        )
    return frame
