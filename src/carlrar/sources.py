"""Which raw files each dataset reads: its classes, its official files, its hub copy and the sampling plan.

Light (no pandas or pyarrow), because the workflow reads it while parsing: the raw files a dataset samples from
are inputs of its prepare job, so a corrected raw file reruns prepare (and nothing after it unless the sampled
rows changed). carlrar.data reads and samples the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from carlrar.config import Config, DatasetConfig, Size


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


def raw_files(ds: DatasetConfig, raw_dir: str | Path) -> list[Path]:
    """The local files preparing ``ds`` reads: per source split, the first of its names that exists in raw_dir.

    A split with no local file is read from the hub (and has no file to list).
    """
    spec, found = DATASETS[ds.name], []
    for split in source_plan(ds):
        paths = [Path(raw_dir) / ds.name / name for name in source_names(spec, ds, split)]
        found += [path for path in paths if path.is_file()][:1]
    return found
