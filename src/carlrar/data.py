"""The paper's dataset splits (Table 9): read the official files, sample stratified and deterministic splits.

Sources are tried in this order for each split: the file in ``<raw_dir>/<dataset>/`` (the official name, or
the ones the config's ``files`` gives, first existing wins; its format is recognised from its first line:
GLUE TSV, a plain ``label,text`` CSV, or the Zhang et al. 2015 CSV), then the Hugging Face hub. The sample is a
function of the data seed and the source rows only: every method and training seed sees identical splits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from carlrar import __version__
from carlrar.config import Config, DatasetConfig, Size
from carlrar.errors import CarlrarError, first_line
from carlrar.storage import atomic_dir, check_output_dir, sha256_file, write_json

SPLITS = ("train", "dev", "test")


class DataError(CarlrarError):
    """Raw data that is missing, malformed or too small for the requested sample."""


@dataclass(frozen=True)
class DatasetSpec:
    """What is fixed about a dataset: its classes, its official files and its hub copy."""

    name: str
    label_names: tuple[str, ...]  # every class of the source, in the official order
    num_kept: int  # the first num_kept classes are used (Yahoo!: 5 of 10, SPEC 1)
    official_files: dict[str, str]
    text_fields: int  # text columns after the class column in the Zhang et al. CSV
    hub_path: str
    hub_name: str | None
    hub_splits: dict[str, str]
    hub_text_keys: tuple[str, ...]
    hub_label_key: str

    @property
    def kept_label_names(self) -> list[str]:
        return list(self.label_names[: self.num_kept])


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "sst2",
            ("negative", "positive"),
            2,
            {"train": "train.tsv", "dev": "dev.tsv"},
            1,
            "nyu-mll/glue",
            "sst2",
            {"train": "train", "dev": "validation"},
            ("sentence",),
            "label",
        ),
        DatasetSpec(
            "ag_news",
            ("World", "Sports", "Business", "Sci/Tech"),
            4,
            {"train": "train.csv", "test": "test.csv"},
            2,
            "fancyzhx/ag_news",
            None,
            {"train": "train", "test": "test"},
            ("text",),
            "label",
        ),
        DatasetSpec(
            "yelp_polarity",
            ("negative", "positive"),
            2,
            {"train": "train.csv", "test": "test.csv"},
            1,
            "fancyzhx/yelp_polarity",
            None,
            {"train": "train", "test": "test"},
            ("text",),
            "label",
        ),
        DatasetSpec(
            "yahoo_answers",
            (
                "Society & Culture",
                "Science & Mathematics",
                "Health",
                "Education & Reference",
                "Computers & Internet",
                "Sports",
                "Business & Finance",
                "Entertainment & Music",
                "Family & Relationships",
                "Politics & Government",
            ),
            5,
            {"train": "train.csv", "test": "test.csv"},
            3,
            "community-datasets/yahoo_answers_topics",
            None,
            {"train": "train", "test": "test"},
            ("question_title", "question_content", "best_answer"),
            "topic",
        ),
    )
}


@dataclass
class RawSplit:
    """Rows of one source split: text, 0-based label over all source classes, and the row's line number."""

    texts: list[str]
    labels: list[int]
    rows: list[int]
    source: dict[str, Any]


def _join(fields: list[str]) -> str:
    return " ".join(part for part in (f.strip() for f in fields) if part)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); re-encode the file as UTF-8") from None


def _label_from_text(value: str, spec: DatasetSpec, where: str, one_based: bool) -> int:
    names = {name.lower(): i for i, name in enumerate(spec.label_names)}
    value = value.strip()
    if value.lower() in names:
        return names[value.lower()]
    try:
        label = int(value) - (1 if one_based else 0)
    except ValueError:
        label = -1
    if not 0 <= label < len(spec.label_names):
        first = 1 if one_based else 0
        raise DataError(
            f"{where}: unknown label {value!r}; {spec.name} labels are {first}..{first + len(spec.label_names) - 1}"
            f" or the names {', '.join(spec.label_names)}"
        )
    return label


def _strict_records(reader: Any, path: Path) -> Iterator[list[str]]:
    """The reader's records; a malformed quote (e.g. a file cut inside a quoted field) is one DataError.

    ``strict=True`` readers raise instead of silently closing the open field at the end of the file, which
    would turn half a row into an example.
    """
    try:
        yield from reader
    except csv.Error as exc:
        raise DataError(
            f"{path}:{reader.line_num}: malformed CSV ({exc}): a quoted field is not closed or a quote is "
            "misplaced; is the file cut short? Restore the complete file"
        ) from None


def read_file(path: Path, spec: DatasetSpec) -> RawSplit:
    """Read one raw file, recognising its format from the first line."""
    text = _decode(path)
    csv.field_size_limit(1 << 30)  # Yahoo! answers exceed the default 128 KiB field limit
    first_line = text.split("\n", 1)[0].rstrip("\r")
    if first_line.split("\t") == ["sentence", "label"]:
        fmt, reader, n_cols, one_based = (
            "glue-tsv",
            csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE),
            2,
            False,
        )
        next(reader)
    elif first_line.replace(" ", "").lower() == "label,text":
        fmt, reader, n_cols = "label-text-csv", csv.reader(io.StringIO(text), strict=True), 2
        next(reader)
        one_based = None  # decided below: integer labels are 1-based unless the file uses 0
    else:
        fmt, reader, n_cols, one_based = (
            "zhang-csv",
            csv.reader(io.StringIO(text), strict=True),
            1 + spec.text_fields,
            True,
        )

    parsed: list[tuple[int, str, str]] = []
    for record in _strict_records(reader, path):
        line = reader.line_num
        if not record or record == [""]:
            continue
        if len(record) != n_cols:
            raise DataError(
                f"{path}:{line}: expected {n_cols} columns ({fmt}), found {len(record)}; "
                f"is this the {spec.name} file in its official format?"
            )
        label_field, fields = (record[1], record[:1]) if fmt == "glue-tsv" else (record[0], record[1:])
        body = _join(fields)
        if not body:
            raise DataError(f"{path}:{line}: empty text")
        parsed.append((line, label_field, body))
    if not parsed:
        raise DataError(f"{path}: no rows")
    if one_based is None:
        one_based = not any(label.strip() == "0" for _, label, _ in parsed)
    labels = [_label_from_text(label, spec, f"{path}:{line}", one_based) for line, label, _ in parsed]
    return RawSplit(
        texts=[body for _, _, body in parsed],
        labels=labels,
        rows=[line for line, _, _ in parsed],
        source={"file": f"{spec.name}/{path.name}", "format": fmt, "sha256": sha256_file(path)},
    )


def _hub_offline() -> bool:
    return any(
        os.environ.get(var, "").lower() in {"1", "true", "yes"} for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def read_hub(spec: DatasetSpec, split: str) -> RawSplit:
    """The real loading path for users with hub access; the same normalisation as the local files."""
    import datasets  # imported here: slow to import and needed only without local files

    hub_split = spec.hub_splits[split]
    ds = datasets.load_dataset(spec.hub_path, spec.hub_name, split=hub_split)
    texts = [_join([str(row[key] or "") for key in spec.hub_text_keys]) for row in ds]
    return RawSplit(
        texts=texts,
        labels=[int(label) for label in ds[spec.hub_label_key]],
        rows=list(range(len(texts))),
        source={
            "hub": spec.hub_path,
            "name": spec.hub_name,
            "split": hub_split,
            "fingerprint": getattr(ds, "_fingerprint", None),
        },
    )


def source_names(spec: DatasetSpec, ds: DatasetConfig, split: str) -> list[str]:
    """The names tried in ``<raw_dir>/<dataset>/`` for a source split, in order: the config's files, else official."""
    configured = ds.files.get(split)
    return [configured] if isinstance(configured, str) else list(configured or [spec.official_files[split]])


def source_plan(ds: DatasetConfig) -> dict[str, dict[str, Size]]:
    """Source split -> the output splits sampled from it and their sizes per class.

    Train always; its dev block first when dev comes from train, so that an "all" train takes the rest. GLUE's
    dev file only when dev is the official one, and the test file only when test rows are asked for: a dataset
    needs no file it samples nothing from.
    """
    train_sizes: dict[str, Size] = {"dev": ds.per_class["dev"]} if ds.dev_source == "train" else {}
    plan: dict[str, dict[str, Size]] = {"train": {**train_sizes, "train": ds.per_class["train"]}}
    if ds.dev_source == "official":
        plan["dev"] = {"dev": ds.per_class["dev"]}
    if ds.per_class["test"] != 0:
        plan["test"] = {"test": ds.per_class["test"]}
    return plan


def missing_local_files(config: Config, raw_dir: str | Path) -> list[str]:
    """``<dataset>/<file>`` for every source split of the config's datasets that has no file in ``raw_dir``.

    Alternatives the config lists are joined with " or ". Empty when every split can be read locally, i.e.
    preparing the data needs no hub download (what a pipeline that hashes ``raw_dir`` as its input relies on).
    """
    missing = []
    for name, ds in config.datasets.items():
        spec = DATASETS.get(name)
        if spec is None:  # an unknown name is the config check's to report
            continue
        for split in source_plan(ds):
            names = source_names(spec, ds, split)
            if not any((Path(raw_dir) / name / file).is_file() for file in names):
                missing.append(" or ".join(f"{name}/{file}" for file in names))
    return missing


def load_source(raw_dir: Path, spec: DatasetSpec, ds: DatasetConfig, split: str) -> RawSplit:
    """The first local file that exists, then the hub; offline with neither, one error saying what to put where.

    The config's ``files`` may name one file or a list tried in order (e.g. the official ``train.csv``, then a
    partial copy). Without the official name among them, no hub download is attempted.
    """
    names = source_names(spec, ds, split)
    paths = [raw_dir / spec.name / name for name in names]
    for path in paths:
        if path.is_file():
            return read_file(path, spec)
    looked = " or ".join(str(p) for p in paths)
    if spec.official_files[split] not in names:
        raise DataError(f"{looked} not found (named by config key datasets.{spec.name}.files.{split})")
    advice = (
        f"no local {spec.name} {split} data: looked for {looked}. Put the official file there "
        f"(or a CSV with header 'label,text' and set datasets.{spec.name}.files.{split} to its name), "
        f"or allow hub access to download {spec.hub_path}"
    )
    if _hub_offline():
        raise DataError(advice + " (HF_HUB_OFFLINE is set)")
    try:
        return read_hub(spec, split)
    except Exception as exc:  # any hub failure means the same thing to the user: the data is not here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{advice}; the hub failed: {reason}") from None


def _order_key(seed: int, row: int) -> bytes:
    """A seeded, platform- and version-independent shuffle key for a source row."""
    return hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest()


def _take(count: Size, available: int) -> int:
    return available if count == "all" else int(count)


def stratified_sample(
    raw: RawSplit, spec: DatasetSpec, sizes: dict[str, Size], seed: int, origin: str
) -> dict[str, list[int]]:
    """Per class, order the rows by a seeded hash and cut consecutive, non-overlapping blocks.

    ``sizes`` maps output split -> rows per class, in the order the blocks are cut ("all" takes the rest).
    Returns output split -> positions in ``raw``, in source order.
    """
    by_class: dict[int, list[int]] = {c: [] for c in range(spec.num_kept)}
    for position, label in enumerate(raw.labels):
        if label < spec.num_kept:
            by_class[label].append(position)
    chosen: dict[str, list[int]] = {split: [] for split in sizes}
    fixed = {split: n for split, n in sizes.items() if n != "all"}
    for label, positions in by_class.items():
        asked = sum(int(n) for n in fixed.values())
        where = raw.source.get("file", raw.source.get("hub"))
        if not positions:
            raise DataError(f"{spec.name} {origin}: class {label} '{spec.label_names[label]}' has no rows in {where}")
        if len(positions) < asked:
            detail = " + ".join(f"{split} {int(n):,}" for split, n in fixed.items())
            raise DataError(
                f"{spec.name} {origin}: class {label} '{spec.label_names[label]}' has {len(positions):,} rows "
                f"in {where}, but {asked:,} were asked per class ({detail})"
            )
        positions.sort(key=lambda p: _order_key(seed, raw.rows[p]))
        start = 0
        for split, n in sizes.items():
            count = _take(n, len(positions) - asked) if n == "all" else int(n)
            chosen[split].extend(positions[start : start + count])
            start += count
    return {split: sorted(picked) for split, picked in chosen.items()}


def _content_sha256(texts: list[str], labels: list[int]) -> str:
    digest = hashlib.sha256()
    for label, text in zip(labels, texts, strict=True):
        digest.update(json.dumps([label, text], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _write_split(path: Path, texts: list[str], labels: list[int], rows: list[int]) -> None:
    table = pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "label": pa.array(labels, pa.int64()),
            "source_row": pa.array(rows, pa.int64()),
        }
    )
    pq.write_table(table, path, compression="zstd")


def prepare_dataset(config: Config, name: str, raw_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write ``train/dev/test.parquet`` and ``manifest.json`` to ``out_dir`` atomically; return the manifest."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    spec, ds = DATASETS[name], config.dataset(name)
    # Before reading anything: an --out that is a file or a folder of other files is refused, never moved.
    check_output_dir(out_dir, replaces="manifest.json")
    raw_dir = Path(raw_dir)
    splits: dict[str, tuple[list[str], list[int], list[int]]] = {s: ([], [], []) for s in SPLITS}
    sources: dict[str, dict[str, Any]] = {}
    for origin, sizes in source_plan(ds).items():
        raw = load_source(raw_dir, spec, ds, origin)
        sources[origin] = raw.source
        for split, positions in stratified_sample(raw, spec, sizes, config.data.seed, origin).items():
            splits[split] = (
                [raw.texts[p] for p in positions],
                [raw.labels[p] for p in positions],
                [raw.rows[p] for p in positions],
            )

    manifest: dict[str, Any] = {
        "dataset": name,
        "label_names": spec.kept_label_names,
        "num_labels": spec.num_kept,
        "evaluation_split": ds.evaluate,
        "model_selection_split": "dev",
        "data_seed": config.data.seed,
        "max_length": config.data.max_length,
        "per_class_requested": {split: ds.per_class[split] for split in SPLITS},  # fixed order: same data, same bytes
        "dev_source": ds.dev_source,
        "sources": sources,
        "splits": {},
        "carlrar_version": __version__,
    }
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            texts, labels, rows = splits[split]
            _write_split(tmp / f"{split}.parquet", texts, labels, rows)
            manifest["splits"][split] = {
                "rows": len(labels),
                "label_counts": [labels.count(c) for c in range(spec.num_kept)],
                "sha256": _content_sha256(texts, labels),
                "source": {"train": "train", "dev": "train" if ds.dev_source == "train" else "dev", "test": "test"}[
                    split
                ]
                if labels
                else None,
            }
        write_json(tmp / "manifest.json", manifest)
    return manifest


REPREPARE = "rerun 'carlrar prepare' for this dataset"


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """A prepared folder's manifest, checked for the keys every later step relies on; else one DataError."""
    path = Path(data_dir) / "manifest.json"
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
    if manifest.get("dataset") not in DATASETS:
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
    if _content_sha256(texts, labels) != expected["sha256"]:
        raise DataError(
            f"{path} does not match its manifest (the sha256 of its rows differs): it was changed or comes from "
            f"another prepare; {REPREPARE}"
        )
    return frame
