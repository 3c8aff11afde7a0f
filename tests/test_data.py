"""The data stage: loaders in every supported format, deterministic stratified splits, and clear errors."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers.paths import ROOT

from carlrar import data as data_module
from carlrar.cli import main
from carlrar.config import ConfigError, from_mapping, load_config
from carlrar.data import DATASETS, DataError, prepare_dataset, read_file
from carlrar.errors import CarlrarError


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def zhang_csv(rows: list[tuple]) -> str:
    return "".join(",".join(f'"{field}"' for field in row) + "\n" for row in rows)


def make_raw(root: Path, per_class: int = 12) -> Path:
    """Small raw files in each dataset's official format."""
    rng = random.Random(0)
    sst_rows = [f"sentence {i} is {'good' if i % 3 else 'bad'} \t{int(bool(i % 3))}" for i in range(3 * per_class)]
    write(root / "sst2/train.tsv", "sentence\tlabel\n" + "\n".join(sst_rows) + "\n")
    write(root / "sst2/dev.tsv", 'sentence\tlabel\nit \'s "quoted" fine . \t1\nbad film . \t0\n')
    for split in ("train", "test"):
        write(
            root / f"ag_news/{split}.csv",
            zhang_csv([(c, f"Title {c}-{i}", f"Body {i}") for i in range(per_class) for c in (1, 2, 3, 4)]),
        )
        write(
            root / f"yelp_polarity/{split}.csv",
            zhang_csv([(c, f"review {i} with quotes and, commas") for i in range(per_class) for c in (1, 2)]),
        )
        write(
            root / f"yahoo_answers/{split}.csv",
            zhang_csv(
                [
                    (c, f"q{i}", "" if i % 2 else f"content {i}", f"answer {rng.random():.3f}")
                    for i in range(per_class)
                    for c in range(1, 11)
                ]
            ),
        )
    return root


def config(tmp_path: Path, datasets: dict, seed: int = 7) -> Path:
    path = tmp_path / f"config-{seed}.yaml"
    path.write_text(yaml.safe_dump({"data": {"seed": seed, "max_length": 64}, "datasets": datasets}))
    return path


SMALL = {
    "sst2": {"per_class": {"train": "all", "dev": "all", "test": 0}, "dev_source": "official", "evaluate": "dev"},
    "ag_news": {"per_class": {"train": 6, "dev": 3, "test": 4}},
    "yelp_polarity": {"per_class": {"train": 5, "dev": 2, "test": "all"}},
    "yahoo_answers": {"per_class": {"train": 4, "dev": 2, "test": 3}},
}


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return make_raw(tmp_path / "raw")


def read_split(out: Path, split: str) -> pd.DataFrame:
    return pd.read_parquet(out / f"{split}.parquet")


@pytest.mark.parametrize("name", list(SMALL))
def test_each_loader_gives_requested_stratified_splits(tmp_path: Path, raw: Path, name: str) -> None:
    out = tmp_path / "out" / name
    manifest = prepare_dataset(load_config(config(tmp_path, {name: SMALL[name]})), name, raw, out)
    spec = DATASETS[name]
    assert manifest["label_names"] == spec.kept_label_names
    for split, size in SMALL[name]["per_class"].items():
        frame = read_split(out, split)
        info = manifest["splits"][split]
        assert info["rows"] == len(frame)
        assert info["label_counts"] == [int((frame.label == c).sum()) for c in range(spec.num_kept)]
        assert set(frame.label) <= set(range(spec.num_kept))
        if isinstance(size, int):
            assert info["label_counts"] == [size] * spec.num_kept
    train, dev = read_split(out, "train"), read_split(out, "dev")
    if SMALL[name].get("dev_source", "train") == "train":
        assert not set(train.source_row) & set(dev.source_row), "train and dev overlap"


def test_fields_are_joined_and_labels_remapped(tmp_path: Path, raw: Path) -> None:
    out = tmp_path / "ag"
    prepare_dataset(load_config(config(tmp_path, {"ag_news": SMALL["ag_news"]})), "ag_news", raw, out)
    row = read_split(out, "test").iloc[0]
    label, i = row.label, row.text.split()[-1]
    assert row.text == f"Title {label + 1}-{i} Body {i}"

    out = tmp_path / "yahoo"
    prepare_dataset(load_config(config(tmp_path, {"yahoo_answers": SMALL["yahoo_answers"]})), "yahoo_answers", raw, out)
    texts = read_split(out, "train").text
    assert set(read_split(out, "train").label) == set(range(5)), "Yahoo! keeps the first five topics"
    assert not texts.str.contains("  ").any(), "an empty middle field must not leave a double space"

    out = tmp_path / "sst2"
    prepare_dataset(load_config(config(tmp_path, {"sst2": SMALL["sst2"]})), "sst2", raw, out)
    dev = read_split(out, "dev")
    assert list(dev.text) == ['it \'s "quoted" fine .', "bad film ."]
    assert list(dev.label) == [1, 0]


def test_label_text_csv_one_based_zero_based_and_names(tmp_path: Path) -> None:
    spec = DATASETS["ag_news"]
    one = read_file(write(tmp_path / "a.csv", 'label,text\n1,a\n4,"b, c"\n'), spec)
    zero = read_file(write(tmp_path / "b.csv", "label,text\n0,a\n3,b\n"), spec)
    names = read_file(write(tmp_path / "c.csv", "label,text\nsports,a\nSci/Tech,b\n"), spec)
    assert one.labels == [0, 3] and one.texts == ["a", "b, c"]
    assert zero.labels == [0, 3]
    assert names.labels == [1, 3]
    assert one.source["format"] == "label-text-csv"


def test_plain_csv_named_in_config_replaces_official_file(tmp_path: Path, raw: Path) -> None:
    write(raw / "ag_news/mine.csv", "label,text\n" + "".join(f"{c},text {c} {i}\n" for i in range(9) for c in range(4)))
    datasets = {"ag_news": {**SMALL["ag_news"], "files": {"train": "mine.csv"}}}
    manifest = prepare_dataset(load_config(config(tmp_path, datasets)), "ag_news", raw, tmp_path / "o")
    assert manifest["sources"]["train"]["file"] == "ag_news/mine.csv"
    assert manifest["sources"]["test"]["format"] == "zhang-csv"


def test_same_config_is_byte_identical_and_seed_changes_sample(tmp_path: Path, raw: Path) -> None:
    cfg = load_config(config(tmp_path, {"ag_news": SMALL["ag_news"]}))
    prepare_dataset(cfg, "ag_news", raw, tmp_path / "a")
    prepare_dataset(cfg, "ag_news", raw, tmp_path / "b")
    for name in ("train.parquet", "dev.parquet", "test.parquet", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = load_config(config(tmp_path, {"ag_news": SMALL["ag_news"]}, seed=8))
    prepare_dataset(other, "ag_news", raw, tmp_path / "c")
    assert list(read_split(tmp_path / "a", "train").source_row) != list(read_split(tmp_path / "c", "train").source_row)


def test_rerun_replaces_existing_output_but_never_a_folder_of_other_files(tmp_path: Path, raw: Path) -> None:
    cfg = load_config(config(tmp_path, {"ag_news": SMALL["ag_news"]}))
    out = tmp_path / "o"
    prepare_dataset(cfg, "ag_news", raw, out)
    write(out / "stale.txt", "old")
    prepare_dataset(cfg, "ag_news", raw, out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    mine = tmp_path / "mine"
    write(mine / "thesis.tex", "years of work")
    with pytest.raises(CarlrarError, match=r"mine holds files but no manifest.json, so it is not an earlier output"):
        prepare_dataset(cfg, "ag_news", raw, mine)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_hub_rows_are_normalised_like_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    fake = datasets.Dataset.from_dict(
        {
            "question_title": ["t"] * 12,
            "question_content": [None] * 12,
            "best_answer": ["a"] * 12,
            "topic": [i % 6 for i in range(12)],
        }
    )
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, split: calls.append((path, split)) or fake)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    datasets_cfg = {"yahoo_answers": {"per_class": {"train": 1, "dev": 1, "test": 2}}}
    manifest = prepare_dataset(
        load_config(config(tmp_path, datasets_cfg)), "yahoo_answers", tmp_path / "none", tmp_path / "o"
    )
    assert calls == [
        ("community-datasets/yahoo_answers_topics", "train"),
        ("community-datasets/yahoo_answers_topics", "test"),
    ]
    assert manifest["splits"]["test"]["label_counts"] == [2] * 5
    assert set(read_split(tmp_path / "o", "train").text) == {"t a"}


def test_hub_failure_names_the_files_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(data_module, "read_hub", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    with pytest.raises(DataError, match=r"looked for .*sst2/train.tsv.*the hub failed: Couldn't reach"):
        prepare_dataset(load_config(config(tmp_path, {"sst2": SMALL["sst2"]})), "sst2", tmp_path, tmp_path / "o")


BAD_INPUTS = {
    "missing file": ("ag_news/train.csv", None, r"looked for .*ag_news/train.csv.*HF_HUB_OFFLINE"),
    "wrong column count": ("ag_news/train.csv", '"1","only title"\n', r"train.csv:1: expected 3 columns"),
    "empty text": ("ag_news/train.csv", '"1","title","desc"\n"2"," ",""\n', r"train.csv:2: empty text"),
    "undecodable text": ("ag_news/train.csv", b'"1","caf\xe9","x"\n', r"train.csv:1: not UTF-8"),
    "unknown label": ("ag_news/train.csv", '"1","a","b"\n"7","a","b"\n', r"train.csv:2: unknown label '7'"),
    "class too small": (
        "ag_news/train.csv",
        zhang_csv([(c, "t", f"d{i}") for i in range(8) for c in (1, 2, 3, 4)]),
        r"class 0 'World' has 8 rows .* but 9 were asked per class \(dev 3 \+ train 6\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_error_and_no_output(
    tmp_path: Path, raw: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    relative, content, pattern = BAD_INPUTS[case]
    if content is None:
        (raw / relative).unlink()
    else:
        write(raw / relative, content)
    out = tmp_path / "out"
    code = main(
        [
            "prepare",
            "--config",
            str(config(tmp_path, {"ag_news": SMALL["ag_news"]})),
            "--dataset",
            "ag_news",
            "--raw-dir",
            str(raw),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary output left behind"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"evaluate": "tst"}, r"datasets.ag_news.evaluate': 'tst' is not allowed; choose one of 'dev', 'test'"),
        ({"per_class": {"train": -1, "dev": 1, "test": 1}}, r"datasets.ag_news.per_class.train'"),
        ({"colour": 1}, r"datasets.ag_news'.*'colour'.*known keys: batch_size"),
        ({"dev_source": "official"}, r"'official' exists only for sst2"),
    ],
)
def test_config_errors_name_key_and_allowed_values(patch: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_mapping({"datasets": {"ag_news": {**SMALL["ag_news"], **patch}}})


def test_config_unknown_dataset_name() -> None:
    with pytest.raises(ConfigError, match=r"config key 'datasets': 'imdb' is not allowed; choose one of 'sst2'"):
        from_mapping({"datasets": {"imdb": SMALL["ag_news"]}})


def test_paper_config_carries_table_values(paper_config_path: Path) -> None:
    cfg = load_config(paper_config_path)
    assert cfg.dataset("ag_news").per_class == {"train": 15000, "dev": 500, "test": 500}
    assert cfg.dataset("ag_news").batch_size == 16
    assert cfg.dataset("sst2").freelb.adv_steps == 2
    assert cfg.dataset("yelp_polarity").carl.negatives == 20000
    assert cfg.data.max_length == 128


# --- the committed fixtures (tests/fixtures/raw): invented rows in the official formats -------------------------
FIXTURE_FILES = [
    ("sst2", "train.tsv", "glue-tsv"),
    ("sst2", "dev.tsv", "glue-tsv"),
    ("ag_news", "train.csv", "zhang-csv"),
    ("ag_news", "test.csv", "zhang-csv"),
    ("yelp_polarity", "train.csv", "zhang-csv"),
    ("yelp_polarity", "test.csv", "zhang-csv"),
    ("yahoo_answers", "train.csv", "zhang-csv"),
    ("yahoo_answers", "test.csv", "zhang-csv"),
]


@pytest.mark.parametrize(("name", "file", "fmt"), FIXTURE_FILES)
def test_fixture_files_parse_in_their_official_format_one_example_per_line(
    raw_dir: Path, name: str, file: str, fmt: str
) -> None:
    """Each fixture record is one line, so a parser that merged or dropped rows at a quote would be caught."""
    path = raw_dir / name / file
    split = read_file(path, DATASETS[name])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert split.source["format"] == fmt
    assert len(split.texts) == len(lines) - (fmt == "glue-tsv")
    assert all(text and text == text.strip() for text in split.texts)
    assert set(split.labels) <= set(range(len(DATASETS[name].label_names))) and len(set(split.labels)) > 1


def test_fixture_fields_are_joined_and_unquoted_as_in_the_official_files(raw_dir: Path) -> None:
    ag = read_file(raw_dir / "ag_news/train.csv", DATASETS["ag_news"])
    assert ag.texts[0].startswith("Leaders meet for talks on river dispute The heads of two neighbouring states")
    assert ag.labels[:4] == [0, 1, 2, 3]
    yelp = read_file(raw_dir / "yelp_polarity/train.csv", DATASETS["yelp_polarity"])
    assert 'it was "non-smoking". Front desk shrugged.\\nWill not stay again.' in yelp.texts[2]
    yahoo = read_file(raw_dir / "yahoo_answers/train.csv", DATASETS["yahoo_answers"])
    assert yahoo.texts[0] == (  # an empty question content leaves no double space
        "Why do people celebrate new year on different days? Different cultures use different calendars, lunar or "
        "solar, so the first day of the year falls at different times."
    )
    sst2 = read_file(raw_dir / "sst2/train.tsv", DATASETS["sst2"])
    assert sst2.texts[0] == "a dull , plodding mess that goes nowhere" and sst2.labels[:2] == [0, 1]


def test_the_smoke_config_and_paper_rules_prepare_from_the_fixtures(tmp_path: Path, raw_dir: Path) -> None:
    smoke = load_config(ROOT / "config" / "smoke.yaml")
    first = prepare_dataset(smoke, "sst2", raw_dir, tmp_path / "a")
    assert first["splits"]["train"]["label_counts"] == [24, 24] and first["splits"]["dev"]["label_counts"] == [8, 8]
    prepare_dataset(smoke, "sst2", raw_dir, tmp_path / "b")
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()
    datasets = {
        "ag_news": {"per_class": {"train": 6, "dev": 2, "test": "all"}},
        "yahoo_answers": {"per_class": {"train": 1, "dev": 1, "test": "all"}},
    }
    cfg = load_config(config(tmp_path, datasets))
    ag = prepare_dataset(cfg, "ag_news", raw_dir, tmp_path / "ag")
    assert ag["splits"]["test"]["label_counts"] == [4, 4, 4, 4] and ag["splits"]["train"]["rows"] == 24
    yahoo = prepare_dataset(cfg, "yahoo_answers", raw_dir, tmp_path / "yahoo")  # the first five topics only
    assert yahoo["num_labels"] == 5 and yahoo["splits"]["test"]["label_counts"] == [1] * 5


# --- the real datasets in $RAW_DIR (../shared/data): skipped where they are missing ---------------------------


def test_real_sst2_paper_config(tmp_path: Path, real_raw_dir: Path, paper_config_path: Path) -> None:
    cfg = load_config(paper_config_path)
    first = prepare_dataset(cfg, "sst2", real_raw_dir, tmp_path / "a")
    assert first["splits"]["train"]["rows"] == 67349
    assert first["splits"]["train"]["label_counts"] == [29780, 37569]
    assert first["splits"]["dev"]["rows"] == 872
    assert first["splits"]["dev"]["label_counts"] == [428, 444]
    assert first["evaluation_split"] == "dev"
    prepare_dataset(cfg, "sst2", real_raw_dir, tmp_path / "b")
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()


def test_real_ag_news_test_complete_and_partial_train(tmp_path: Path, real_raw_dir: Path) -> None:
    too_many = {
        "ag_news": {"per_class": {"train": 15000, "dev": 500, "test": "all"}, "files": {"train": "train_partial.csv"}}
    }
    with pytest.raises(DataError, match=r"class 0 'World' has 10,679 rows in ag_news/train_partial.csv, but 15,500"):
        prepare_dataset(load_config(config(tmp_path, too_many)), "ag_news", real_raw_dir, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    fits = {"ag_news": {**too_many["ag_news"], "per_class": {"train": 2000, "dev": 500, "test": "all"}}}
    manifest = prepare_dataset(load_config(config(tmp_path, fits)), "ag_news", real_raw_dir, tmp_path / "ag")
    assert manifest["splits"]["train"]["label_counts"] == [2000] * 4
    assert manifest["splits"]["test"]["rows"] == 7600
    assert manifest["splits"]["test"]["label_counts"] == [1900] * 4
    assert json.loads((tmp_path / "ag/manifest.json").read_text())["sources"]["test"]["format"] == "zhang-csv"


def test_real_yelp_and_yahoo_pieces_parse(real_raw_dir: Path) -> None:
    yelp = read_file(real_raw_dir / "yelp_polarity/train_head200.csv", DATASETS["yelp_polarity"])
    assert len(yelp.labels) == 200 and set(yelp.labels) == {0, 1}
    assert yelp.source["format"] == "zhang-csv"
    yelp_test = read_file(real_raw_dir / "yelp_polarity/test_head20.csv", DATASETS["yelp_polarity"])
    assert len(yelp_test.labels) == 20
    yahoo = read_file(real_raw_dir / "yahoo_answers/sample_10class.csv", DATASETS["yahoo_answers"])
    assert len(yahoo.labels) == 1000 and set(yahoo.labels) == set(range(10))
    assert yahoo.source["format"] == "label-text-csv"


def test_file_list_takes_the_first_existing_and_falls_back_to_the_hub(tmp_path: Path, raw: Path) -> None:
    (raw / "ag_news/train.csv").rename(raw / "ag_news/train_partial.csv")
    datasets = {"ag_news": {**SMALL["ag_news"], "files": {"train": ["train.csv", "train_partial.csv"]}}}
    manifest = prepare_dataset(load_config(config(tmp_path, datasets)), "ag_news", raw, tmp_path / "o")
    assert manifest["sources"]["train"]["file"] == "ag_news/train_partial.csv"
    (raw / "ag_news/train_partial.csv").unlink()
    with pytest.raises(DataError, match=r"looked for .*train.csv or .*train_partial.csv.*HF_HUB_OFFLINE"):
        prepare_dataset(load_config(config(tmp_path, datasets)), "ag_news", raw, tmp_path / "p")


def test_overrides_set_nested_keys_and_are_validated(tmp_path: Path) -> None:
    path = config(tmp_path, {"ag_news": SMALL["ag_news"]})
    cfg = load_config(path, ["datasets.ag_news.freelb.adv_lr=0.05", "data.seed=11", "training.methods=[base, carl]"])
    assert cfg.dataset("ag_news").freelb.adv_lr == 0.05 and cfg.data.seed == 11
    assert cfg.training["methods"] == ["base", "carl"]
    with pytest.raises(ConfigError, match="datasets.ag_news.freelb.adv_steps'"):
        load_config(path, ["datasets.ag_news.freelb.adv_steps=zero"])
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        load_config(path, ["data.seed"])
    with pytest.raises(ConfigError, match="'seed' holds a value"):
        load_config(path, ["data.seed.x=1"])


def test_dataset_names_agree_across_config_schema_and_loaders() -> None:
    from carlrar.config import load_schema
    from carlrar.registry import DATASET_IDS as DATASET_NAMES

    assert set(DATASET_NAMES) == set(DATASETS)
    assert set(load_schema()["properties"]["datasets"]["propertyNames"]["enum"]) == set(DATASET_NAMES)


def test_prepared_splits_are_verified_against_the_manifest(tmp_path: Path, raw: Path) -> None:
    """Later steps read a split only if its rows hash to the manifest's sha256; a damaged manifest is refused."""
    from carlrar.prepared import read_manifest, read_split

    out = tmp_path / "ag"
    prepare_dataset(load_config(config(tmp_path, {"ag_news": SMALL["ag_news"]})), "ag_news", raw, out)
    manifest = read_manifest(out)
    assert list(read_split(out, "train", manifest)["text"]) == list(read_split(out, "train", manifest)["text"])

    frame = pd.read_parquet(out / "dev.parquet")
    frame.loc[0, "text"] = frame.loc[0, "text"] + " changed"
    frame.to_parquet(out / "dev.parquet")
    with pytest.raises(DataError, match=r"dev.parquet does not match its manifest .* rerun 'carlrar prepare'"):
        read_split(out, "dev", manifest)
    (out / "test.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"test.parquet is damaged or not a prepared split"):
        read_split(out, "test", manifest)

    (out / "manifest.json").write_text('{"dataset": "ag_news", "num_labels": 4, "evaluation_split": "test"}')
    with pytest.raises(DataError, match=r"manifest.json is damaged \(splits.train lacks its rows and sha256\)"):
        read_manifest(out)
    (out / "manifest.json").write_text('{"dataset": "ag_news", ')
    with pytest.raises(DataError, match=r"manifest.json is damaged \(Expecting"):
        read_manifest(out)


def test_exponent_numbers_are_numbers_and_every_number_is_finite_and_bounded(tmp_path: Path) -> None:
    path = config(tmp_path, {"ag_news": SMALL["ag_news"]})
    cfg = load_config(path, ["training.learning_rate=1e-4", "analysis.epsilons=[2E-2, 0.1]", "run_name=1e5"])
    assert cfg.training["learning_rate"] == 1e-4 and cfg.analysis.epsilons == (0.02, 0.1)
    assert cfg.run_name == "1e5", "only number-typed keys are read as numbers"
    for override, message in (
        ("training.learning_rate=.inf", r"'training.learning_rate': NaN and infinity are not allowed"),
        ("datasets.ag_news.freelb.adv_lr=.nan", r"'datasets.ag_news.freelb.adv_lr': NaN and infinity"),
        ("datasets.ag_news.freelb.adv_lr=1e9", r"'datasets.ag_news.freelb.adv_lr': 1000000000.0 is greater than"),
        ("training.seeds=[4294967296]", r"'training.seeds.0': 4294967296 is greater than the maximum"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(path, [override])


def test_a_csv_cut_inside_a_quoted_field_is_refused(tmp_path: Path) -> None:
    cut = write(tmp_path / "train.csv", '"1","title","body"\n"2","half a title')
    with pytest.raises(DataError, match=r"train.csv:2: malformed CSV \(unexpected end of data\).*cut short"):
        read_file(cut, DATASETS["ag_news"])
    stray = write(tmp_path / "test.csv", 'label,text\n1,"quoted" then more\n')
    with pytest.raises(DataError, match=r"test.csv:2: malformed CSV"):
        read_file(stray, DATASETS["ag_news"])


@pytest.mark.parametrize(
    ("name", "dataset", "text"),
    [
        ("train.tsv", "sst2", "sentence\tlabel\na good film \t1\na bad film \t0\n"),
        ("mine.csv", "ag_news", "label,text\n1,world news\n2,a match\n"),
    ],
)
def test_a_byte_order_mark_is_not_part_of_the_header(tmp_path: Path, name: str, dataset: str, text: str) -> None:
    """Spreadsheet exports start with a UTF-8 BOM: the file reads as the same file without it, not as a column
    count error of an unrecognised format."""
    plain = read_file(write(tmp_path / "plain" / name, text), DATASETS[dataset])
    marked = read_file(write(tmp_path / "bom" / name, b"\xef\xbb\xbf" + text.encode()), DATASETS[dataset])
    assert (marked.texts, marked.labels, marked.rows) == (plain.texts, plain.labels, plain.rows)
    assert marked.source["format"] == plain.source["format"] != "zhang-csv"


def test_config_files_are_read_strictly_yet_merge_keys_and_json_still_work(tmp_path: Path) -> None:
    """A key written twice is refused (YAML and JSON), while a merge (<<) may override what it brings in."""
    from carlrar.config import read_yaml

    merged = write(tmp_path / "merge.yaml", "base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")
    assert read_yaml(merged)["other"] == {"x": 3, "y": 2}
    tabbed = write(tmp_path / "tabs.json", '{\n\t"run_name": "t",\n\t"training": {"seeds": [1]}\n}\n')
    assert read_yaml(tabbed) == {"run_name": "t", "training": {"seeds": [1]}}  # no valid YAML: tabs indent it
    twice = write(tmp_path / "twice.json", '{"training": {"seeds": [1]}, "training": {"seeds": [2]}}')
    with pytest.raises(ConfigError, match=r"twice.json: duplicate key 'training' in a JSON object; keep one"):
        read_yaml(twice)
    nested = write(tmp_path / "nested.yaml", "training:\n  carl:\n    temperature: 0.07\n    temperature: 0.5\n")
    with pytest.raises(ConfigError, match=r"nested.yaml is not valid YAML: line 4: duplicate key 'temperature' "):
        read_yaml(nested)
