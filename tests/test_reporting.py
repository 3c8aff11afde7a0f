"""Table 2 from metrics.json files: numbers checked against plain arithmetic, layout, and clear errors."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest

from carlrar.errors import CarlrarError
from carlrar.reporting import write_table2

ACCURACIES = {  # (dataset, method) -> eval accuracy per seed 1, 2, 3
    ("ag_news", "base"): [0.8990, 0.9012, 0.8951],
    ("ag_news", "freelb"): [0.9085, 0.9110, 0.9042],
    ("ag_news", "carl"): [0.9205, 0.9190, 0.9233],
    ("ag_news", "rar"): [0.9175, 0.9161, 0.9188],
    ("sst2", "base"): [0.9216, 0.9197, 0.9232],
    ("sst2", "freelb"): [0.9323, 0.9300, 0.9346],
    ("sst2", "carl"): [0.9377, 0.9358, 0.9369],
}
DROP = object()  # a value for metrics_file(**changes) that removes the key
SPLIT = {"sst2": "dev", "ag_news": "test", "yelp_polarity": "test", "yahoo_answers": "test"}


def metrics_file(root: Path, dataset: str, method: str, seed: int, accuracy: float, **changes) -> Path:
    metrics = {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "evaluated_split": SPLIT[dataset],
        "dev_accuracy": accuracy,
        "test_accuracy": None if dataset == "sst2" else accuracy,
        "eval_accuracy": accuracy,
        "params": 1000,
        "steps": 10,
        "train_seconds": 1.0,
        "samples_per_second": 5.0,
        "history": [],
        "config": {},
        "versions": {},
        "data": {},
    }
    metrics.update(changes)
    for key in [k for k, v in changes.items() if v is DROP]:
        del metrics[key]
    path = root / "runs" / dataset / method / f"seed{seed}" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))
    return path


def grid(root: Path, accuracies: dict = ACCURACIES) -> list[Path]:
    # written in reverse order: the table must not depend on the order of the files
    return [
        metrics_file(root, dataset, method, seed, acc)
        for (dataset, method), values in reversed(accuracies.items())
        for seed, acc in zip((3, 2, 1), reversed(values), strict=True)
    ]


def expected(dataset: str, method: str) -> tuple[float, float, float]:
    """Mean, sample std and delta vs FreeLB (of the rounded means), computed plainly."""
    percent = [100 * a for a in ACCURACIES[(dataset, method)]]
    mean, std = round(statistics.mean(percent), 2), round(statistics.stdev(percent), 2)
    reference = round(statistics.mean([100 * a for a in ACCURACIES[(dataset, "freelb")]]), 2)
    return mean, std, round(mean - reference, 2)


def test_table2_numbers_and_layout(tmp_path: Path) -> None:
    prefix = tmp_path / "tables" / "table2_accuracy"
    frame = write_table2(grid(tmp_path), prefix)

    assert list(frame.columns) == ["dataset", "method", "seeds", "mean", "std", "delta_vs_freelb"]
    assert list(zip(frame["dataset"], frame["method"])) == [
        ("sst2", "base"),
        ("sst2", "freelb"),
        ("sst2", "carl"),
        ("ag_news", "base"),
        ("ag_news", "freelb"),
        ("ag_news", "carl"),
        ("ag_news", "rar"),
    ]
    for row in frame.itertuples():
        mean, std, delta = expected(row.dataset, row.method)
        assert row.seeds == 3
        assert row.mean == pytest.approx(mean, abs=1e-9)
        assert row.std == pytest.approx(std, abs=1e-9)
        assert row.delta_vs_freelb == pytest.approx(delta, abs=1e-9)
    assert frame.loc[frame["method"] == "freelb", "delta_vs_freelb"].tolist() == [0.0, 0.0]

    # CSV: long format, round-trips to the returned frame
    back = pd.read_csv(prefix.with_suffix(".csv"))
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)

    # markdown: methods as rows in canonical order, datasets as columns in canonical order
    md = prefix.with_suffix(".md").read_text()
    lines = md.splitlines()
    assert lines[0].index("SST-2") < lines[0].index("AG's News")
    order = [
        next(i for i, line in enumerate(lines) if line.startswith(f"| {name} "))
        for name in ("Base (fine-tuning)", "FreeLB", "CARL", "RAR")
    ]
    assert order == sorted(order)
    mean, std, delta = expected("ag_news", "carl")
    assert f"{mean:.2f} ± {std:.2f} ({delta:+.2f})" in md
    mean, std, _ = expected("sst2", "freelb")
    freelb_line = next(line for line in lines if line.startswith("| FreeLB "))
    assert freelb_line.split("|")[2].strip() == f"{mean:.2f} ± {std:.2f}"  # no delta for FreeLB itself
    assert "(" not in freelb_line
    rar_line = next(line for line in lines if line.startswith("| RAR "))
    assert rar_line.split("|")[2].strip() == ""  # RAR has no SST-2 runs: empty cell
    assert "SST-2 dev" in md and "AG's News test" in md

    tex = prefix.with_suffix(".tex").read_text()
    assert r"\pm" in tex and r"\toprule" in tex and "CARL" in tex and "Yahoo" not in tex
    assert not list(prefix.parent.glob("*.tmp")) and not list(prefix.parent.glob(".*"))


def test_missing_freelb_leaves_delta_blank(tmp_path: Path) -> None:
    accuracies = {k: v for k, v in ACCURACIES.items() if k[0] == "ag_news" and k[1] != "freelb"}
    prefix = tmp_path / "t2"
    frame = write_table2(grid(tmp_path, accuracies), prefix)
    assert frame["delta_vs_freelb"].isna().all()
    csv_lines = prefix.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[1].startswith("ag_news,base,3,") and csv_lines[1].endswith(",")  # blank last field
    md = prefix.with_suffix(".md").read_text()
    assert "FreeLB" not in md.split("\n\n")[0] and "(+" not in md and "(-" not in md


def test_single_seed_has_blank_std_and_marked_count(tmp_path: Path) -> None:
    paths = grid(tmp_path, {("sst2", "base"): [0.9, 0.92, 0.91], ("sst2", "freelb"): [0.93, 0.94, 0.95]})
    paths.append(metrics_file(tmp_path, "sst2", "carl", 1, 0.9444))
    frame = write_table2(paths, tmp_path / "t2")
    carl = frame[frame["method"] == "carl"].iloc[0]
    assert carl["seeds"] == 1 and math.isnan(carl["std"])
    assert carl["delta_vs_freelb"] == pytest.approx(94.44 - 94.0)
    assert "94.44 (+0.44) [n=1]" in (tmp_path / "t2.md").read_text()


def test_duplicate_seed_is_an_error(tmp_path: Path) -> None:
    paths = grid(tmp_path)
    paths.append(metrics_file(tmp_path / "copy", "sst2", "carl", 2, 0.5))
    with pytest.raises(CarlrarError, match=r"two metrics files for dataset sst2, method carl, seed 2"):
        write_table2(paths, tmp_path / "t2")
    assert not (tmp_path / "t2.md").exists()


def test_missing_key_is_an_error(tmp_path: Path) -> None:
    paths = grid(tmp_path)
    paths.append(metrics_file(tmp_path / "other", "ag_news", "carl_rar", 1, 0.9, eval_accuracy=DROP))
    with pytest.raises(CarlrarError, match=r"metrics\.json: missing key\(s\) 'eval_accuracy'"):
        write_table2(paths, tmp_path / "t2")
    assert not list(tmp_path.glob("t2.*"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"eval_accuracy": 93.2}, r"'eval_accuracy' must be a number in \[0, 1\]"),
        ({"evaluated_split": "test"}, r"dataset sst2 is evaluated on 'dev' in .* but on 'test'"),
        ({"seed": 1.0}, r"'seed' must be an integer"),
    ],
)
def test_bad_metrics_are_errors(tmp_path: Path, changes: dict, message: str) -> None:
    paths = grid(tmp_path)
    seed = changes.pop("seed", 1)
    paths.append(metrics_file(tmp_path / "bad", "sst2", "rar", seed, 0.9, **changes))
    with pytest.raises(CarlrarError, match=message):
        write_table2(paths, tmp_path / "t2")


def test_unreadable_inputs_are_errors(tmp_path: Path) -> None:
    with pytest.raises(CarlrarError, match="no metrics files"):
        write_table2([], tmp_path / "t2")
    with pytest.raises(CarlrarError, match="metrics file not found"):
        write_table2([tmp_path / "nope.json"], tmp_path / "t2")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(CarlrarError, match="not valid JSON"):
        write_table2([broken], tmp_path / "t2")


def test_table7_counts_parameters_per_method_and_dataset(tmp_path: Path) -> None:
    from carlrar.reporting import write_table7

    paths = []
    for dataset, base in (("sst2", 11_685_122), ("ag_news", 11_686_660)):
        for method, extra in (("base", 0), ("freelb", 0), ("carl", 0), ("rar", 128_688)):
            for seed in (1, 2):
                path = tmp_path / f"{dataset}-{method}-{seed}.json"
                path.write_text(
                    json.dumps({"dataset": dataset, "method": method, "seed": seed, "params": base + extra})
                )
                paths.append(path)
    frame = write_table7(paths, tmp_path / "t7")
    assert frame.loc[frame.method == "rar", "extra_vs_base"].tolist() == [128_688, 128_688]
    assert frame["dataset"].tolist()[0] == "sst2"
    markdown = (tmp_path / "t7.md").read_text()
    assert "11,813,810" in markdown and "AG's News" in markdown
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dataset": "sst2", "method": "rar", "seed": 3, "params": 5}))
    with pytest.raises(CarlrarError, match="another seed of sst2/rar"):
        write_table7([*paths, bad], tmp_path / "t7b")


def _summary(path: Path, dataset: str, method: str, seed: int, by_eps: dict[float, tuple[float, float, float]]) -> Path:
    """An attack summary as 'carlrar attack' writes it: eps -> (attacked accuracy, cosine, euclidean)."""
    path.write_text(
        json.dumps(
            {
                "dataset": dataset,
                "method": method,
                "seed": seed,
                "epsilons": {
                    f"{eps:g}": {
                        "epsilon": eps,
                        "clean_accuracy": 0.9,
                        "attacked_accuracy": acc,
                        "attack_success_rate": (0.9 - acc) / 0.9,
                        "mean_cosine": cos,
                        "mean_euclidean": euc,
                    }
                    for eps, (acc, cos, euc) in by_eps.items()
                },
            }
        )
    )
    return path


def test_tables_4_and_5_and_figures_from_attack_summaries(tmp_path: Path) -> None:
    from carlrar.reporting import write_figures, write_table4, write_table5

    values = {("freelb", 1): 0.70, ("freelb", 2): 0.74, ("carl", 1): 0.80, ("carl", 2): 0.78}
    paths = [
        _summary(
            tmp_path / f"{m}{s}.json",
            "ag_news",
            m,
            s,
            {0.1: (acc, acc + 0.1, 5 - acc), 0.075: (acc + 0.05, acc + 0.15, 4 - acc)},
        )
        for (m, s), acc in values.items()
    ]
    table5 = write_table5(paths, tmp_path / "t5")
    row = table5[(table5.method == "carl") & (table5.epsilon == 0.1)].iloc[0]
    assert row["attacked_accuracy_mean"] == pytest.approx(79.0)
    assert row["attacked_accuracy_std"] == pytest.approx(round(statistics.stdev([80.0, 78.0]), 2))
    assert row["seeds"] == 2
    assert table5["method"].tolist()[:2] == ["freelb", "freelb"]  # canonical method order
    assert "79.00 ± 1.41" in (tmp_path / "t5.md").read_text()
    table4 = write_table4(paths, tmp_path / "t4")
    row = table4[(table4.method == "freelb") & (table4.epsilon == 0.075)].iloc[0]
    assert row["mean_cosine_mean"] == pytest.approx(statistics.mean([0.85, 0.89]), abs=1e-3)
    assert (tmp_path / "t4.tex").read_text().count(r"\begin{table}") == 2

    metrics = []
    for (m, s), acc in values.items():
        path = tmp_path / f"metrics-{m}{s}.json"
        path.write_text(
            json.dumps(
                {
                    "dataset": "ag_news",
                    "method": m,
                    "seed": s,
                    "history": [{"epoch": 1.0, "dev_accuracy": acc}, {"epoch": 2.0, "dev_accuracy": acc + 0.1}],
                }
            )
        )
        metrics.append(path)
    written = write_figures(metrics, paths, tmp_path / "figures")
    assert sorted(p.name for p in written) == sorted(
        f"{n}.{e}"
        for n in ("robustness_vs_epsilon", "representation_distance", "learning_curves")
        for e in ("pdf", "png")
    )
    with pytest.raises(CarlrarError, match="two attack summaries"):
        write_table5([*paths, paths[0]], tmp_path / "dup")


def test_table6_counts_and_examples(tmp_path: Path) -> None:
    from carlrar.reporting import write_table6

    example = {
        "original": "a fine film",
        "decoded": "a fined film",
        "gold": 1,
        "base_pred_original": 1,
        "base_pred_decoded": 0,
        "fools_base": True,
    }
    path = tmp_path / "rar1.json"
    path.write_text(
        json.dumps(
            {
                "dataset": "sst2",
                "method": "rar",
                "seed": 1,
                "label_names": ["negative", "positive"],
                "n_examples": 10,
                "n_changed": 4,
                "n_fool_base": 1,
                "examples": [example, {**example, "fools_base": False}],
            }
        )
    )
    counts = write_table6([path], tmp_path / "t6")
    assert counts[["examples", "changed", "fool_base"]].values.tolist() == [[10, 4, 1]]
    markdown = (tmp_path / "t6.md").read_text()
    assert "a fined film" in markdown and "negative" in markdown
