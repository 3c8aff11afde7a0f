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
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from carlrar import __version__
from carlrar.config import Config, DatasetConfig, Size
from carlrar.prepared import (
    MANIFEST_FILE,
    SPLIT_HASHES_FILE,
    SPLITS,
    DataError,
    content_sha256,
    split_hashes,
)
from carlrar.sources import DATASETS, DatasetSpec, source_names, source_plan
from carlrar.storage import atomic_dir, check_output_dir, exclusive, sha256_file, write_json


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
    """The file as text; a UTF-8 byte-order mark (what spreadsheet exports start with) is no part of the header."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
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
    # Before reading anything: an --out that is a file or a folder of other files is refused, never moved.
    check_output_dir(out_dir, replaces=MANIFEST_FILE)
    with exclusive(out_dir):  # one process per output folder; a second names the holder
        return _prepare(config, name, raw_dir, out_dir)


def _prepare(config: Config, name: str, raw_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """prepare_dataset() once it holds ``out_dir``."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    spec, ds = DATASETS[name], config.dataset(name)
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
                "sha256": content_sha256(texts, labels),
                "source": {"train": "train", "dev": "train" if ds.dev_source == "train" else "dev", "test": "test"}[
                    split
                ]
                if labels
                else None,
            }
        write_json(tmp / MANIFEST_FILE, manifest)
        write_json(tmp / SPLIT_HASHES_FILE, split_hashes(manifest))
    return manifest
