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


# t(0.975, df) in closed form: df = 1 is Cauchy, tan(pi/2 * 0.95); df = 2 solves t / sqrt(2 + t^2) = 0.95
T_DF1 = math.tan(math.pi / 2 * 0.95)  # 12.7062
T_DF2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))  # 4.3027


def expected_ci(dataset: str, method: str) -> tuple[float, float]:
    """95 % t-interval of the mean over the three seeds, from the unrounded mean and std."""
    percent = [100 * a for a in ACCURACIES[(dataset, method)]]
    half = T_DF2 * statistics.stdev(percent) / math.sqrt(3)
    return round(statistics.mean(percent) - half, 2), round(statistics.mean(percent) + half, 2)


def test_table2_numbers_and_layout(tmp_path: Path) -> None:
    prefix = tmp_path / "tables" / "table2_accuracy"
    frame = write_table2(grid(tmp_path), prefix)

    assert list(frame.columns) == [
        "dataset",
        "method",
        "seeds",
        "mean",
        "std",
        "delta_vs_freelb",
        "ci95_low",
        "ci95_high",
    ]
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
        assert (row.ci95_low, row.ci95_high) == pytest.approx(expected_ci(row.dataset, row.method), abs=1e-9)
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
    low, high = expected_ci("ag_news", "carl")
    assert f"{mean:.2f} ± {std:.2f} [{low:.2f}, {high:.2f}] ({delta:+.2f})" in md
    mean, std, _ = expected("sst2", "freelb")
    low, high = expected_ci("sst2", "freelb")
    freelb_line = next(line for line in lines if line.startswith("| FreeLB "))
    assert freelb_line.split("|")[2].strip() == f"{mean:.2f} ± {std:.2f} [{low:.2f}, {high:.2f}]"  # no delta
    assert "95 % confidence interval of the mean over seeds (Student t" in md
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
    assert csv_lines[1].startswith("ag_news,base,3,") and csv_lines[1].split(",")[5] == ""  # blank delta
    md = prefix.with_suffix(".md").read_text()
    assert "FreeLB" not in md.split("\n\n")[0] and "(+" not in md and "(-" not in md


def test_single_seed_has_blank_std_and_marked_count(tmp_path: Path) -> None:
    paths = grid(tmp_path, {("sst2", "base"): [0.9, 0.92, 0.91], ("sst2", "freelb"): [0.93, 0.94, 0.95]})
    paths.append(metrics_file(tmp_path, "sst2", "carl", 1, 0.9444))
    frame = write_table2(paths, tmp_path / "t2")
    carl = frame[frame["method"] == "carl"].iloc[0]
    assert carl["seeds"] == 1 and math.isnan(carl["std"]) and math.isnan(carl["ci95_low"])
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
    from carlrar.figures import write_figures
    from carlrar.reporting import write_table4, write_table5

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
    # 95 % t-interval over 2 seeds: 79 ± t(0.975, 1) * sqrt(2) / sqrt(2) = 79 ± 12.71
    assert (row["attacked_accuracy_ci95_low"], row["attacked_accuracy_ci95_high"]) == pytest.approx(
        (round(79 - T_DF1, 2), round(79 + T_DF1, 2)), abs=1e-9
    )
    assert "79.00 ± 1.41 [66.29, 91.71]" in (tmp_path / "t5.md").read_text()
    assert pd.read_csv(tmp_path / "t5.csv").columns[-1] == "attack_success_rate_ci95_high"  # old columns first
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


# --- t-quantiles and the paired comparison ----------------------------------------------------------------------


def test_t_quantile_and_interval_match_hand_computation() -> None:
    from carlrar.reporting import t_interval, t_quantile

    assert t_quantile(0.95, 1) == pytest.approx(T_DF1, rel=1e-9)
    assert t_quantile(0.95, 2) == pytest.approx(T_DF2, rel=1e-9)
    assert t_quantile(0.95, 10) == pytest.approx(2.228139, abs=1e-6)  # printed t tables
    assert t_quantile(0.95, 30) == pytest.approx(2.042272, abs=1e-6)
    # three seeds at 80, 82, 84: mean 82, sample std 2, half-width 4.30265 * 2 / sqrt(3) = 4.9683
    low, high = t_interval(82.0, statistics.stdev([80.0, 82.0, 84.0]), 3)
    assert (low, high) == pytest.approx((82.0 - T_DF2 * 2 / math.sqrt(3), 82.0 + T_DF2 * 2 / math.sqrt(3)))
    assert high - low == pytest.approx(9.9366, abs=1e-4)
    assert all(math.isnan(v) for v in t_interval(82.0, math.nan, 1))


def _predictions_run(root: Path, dataset: str, method: str, seed: int, gold, pred, rows=None, **changes) -> Path:
    """A training run folder with metrics.json and eval_predictions.parquet (rows written shuffled)."""
    rows = list(range(len(gold))) if rows is None else rows
    order = list(reversed(range(len(gold))))  # the file's row order must not matter
    accuracy = sum(int(p == g) for p, g in zip(pred, gold)) / len(gold)
    changes = {"predictions": "eval_predictions.parquet"} | changes
    path = metrics_file(root, dataset, method, seed, accuracy, **changes)
    frame = pd.DataFrame({"row": rows, "gold": gold, "pred": pred}).iloc[order]
    frame.to_parquet(path.parent / "eval_predictions.parquet", index=False)
    return path


def _records_attack(
    root: Path, dataset: str, method: str, seed: int, gold, attacked: dict[float, list[int]], cosine: float = 0.99
) -> Path:
    """An attack folder as 'carlrar attack' writes it: summary.json plus records_eps<eps>.parquet per epsilon."""
    from carlrar.attacks import records_path, summarize

    folder = root / "attacks" / dataset / method / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for eps, pred in attacked.items():
        n = len(gold)
        records = pd.DataFrame(
            {"row": range(n), "gold": gold, "clean_pred": gold, "attacked_pred": pred}
            | {"perturbation_norm": [eps] * n, "cosine": [cosine] * n, "euclidean": [1.0] * n}
        )
        records.to_parquet(records_path(folder, eps), index=False)
        entries[f"{eps:g}"] = {"epsilon": eps, **summarize(records), "records": records_path(folder, eps).name}
    (folder / "summary.json").write_text(
        json.dumps({"dataset": dataset, "method": method, "seed": seed, "epsilons": entries})
    )
    return folder / "summary.json"


N_EXAMPLES, K_MORE = 200, 10


def _k_more_case(root: Path) -> tuple[list[Path], list[Path]]:
    """FreeLB right on 150 of 200 examples, CARL on the same plus K_MORE others, base identical to FreeLB.

    Which examples differs per seed; under attack (eps 0.1) CARL keeps 100 correct and FreeLB 80 of them.
    """
    metrics, summaries = [], []
    for seed in (1, 2, 3):
        gold = [(i * 7 + seed) % 3 for i in range(N_EXAMPLES)]
        wrong = [(g + 1) % 3 for g in gold]
        start = 10 * seed
        freelb = [g if start <= i < start + 150 else w for i, (g, w) in enumerate(zip(gold, wrong))]
        carl = [g if start <= i < start + 150 + K_MORE else w for i, (g, w) in enumerate(zip(gold, wrong))]
        for method, pred in (("freelb", freelb), ("base", freelb), ("carl", carl)):
            metrics.append(_predictions_run(root, "ag_news", method, seed, gold, pred))
        carl_attacked = [g if i < 100 else w for i, (g, w) in enumerate(zip(gold, wrong))]
        freelb_attacked = [g if i < 80 else w for i, (g, w) in enumerate(zip(gold, wrong))]
        for method, pred, cosine in (("freelb", freelb_attacked, 0.99), ("carl", carl_attacked, 0.999)):
            summaries.append(_records_attack(root, "ag_news", method, seed, gold, {0.1: pred}, cosine))
    return metrics, summaries


def _pick(frame: pd.DataFrame, method: str, reference: str, measure: str = "clean") -> pd.Series:
    rows = frame[(frame.method == method) & (frame.reference == reference) & (frame.measure == measure)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_paired_table_known_answers(tmp_path: Path) -> None:
    from carlrar.paired import write_table_paired

    metrics, summaries = _k_more_case(tmp_path)
    frame = write_table_paired(metrics, summaries, tmp_path / "tables" / "table_paired", resamples=2000, seed=5)

    same = _pick(frame, "base", "freelb")  # identical predictions: nothing to find
    assert (same.difference, same.ci95_low, same.ci95_high, same.se, same.mde80) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert same.p_value == 1.0

    carl = _pick(frame, "carl", "freelb")  # right on K_MORE more of N_EXAMPLES in every seed
    assert carl.difference == pytest.approx(100 * K_MORE / N_EXAMPLES)
    assert (carl.seeds, carl.examples) == (3, N_EXAMPLES)
    assert carl.method_accuracy - carl.reference_accuracy == pytest.approx(5.0)
    assert 0 < carl.ci95_low < 5.0 < carl.ci95_high
    assert carl.p_value == pytest.approx(2 / 2001)  # no resample reaches 0: the smallest p there is
    # d_s has K_MORE ones among N zeros; a resample's mean has sd sqrt(p(1-p)/N) per seed, / sqrt(3) over seeds
    p = K_MORE / N_EXAMPLES
    assert carl.se == pytest.approx(100 * math.sqrt(p * (1 - p) / N_EXAMPLES / 3), rel=0.1)
    assert carl.mde80 == pytest.approx(2.8 * carl.se)

    attacked = _pick(frame, "carl", "freelb", "attacked")  # 100 vs 80 of 200 correct under attack
    assert attacked.epsilon == 0.1 and attacked.difference == pytest.approx(10.0)
    assert attacked.method_accuracy == pytest.approx(50.0) and attacked.reference_accuracy == pytest.approx(40.0)
    assert _pick(frame, "freelb", "base").difference == 0.0
    assert not ((frame.method == frame.reference).any())
    assert not ((frame.reference == "base") & (frame.measure == "attacked")).any()  # base was not attacked
    assert len(frame) == 5  # carl/base vs freelb and carl/freelb vs base (clean), carl vs freelb attacked

    csv = pd.read_csv(tmp_path / "tables" / "table_paired.csv")
    assert set(csv["bootstrap_seed"]) == {5} and set(csv["resamples"]) == {2000}
    assert csv.loc[csv.measure == "clean", "epsilon"].isna().all()
    md = (tmp_path / "tables" / "table_paired.md").read_text()
    assert "| CARL − FreeLB " in md and "+5.00*" in md and "B = 2,000 resamples" in md
    assert "CARL − FreeLB (clean, +5.00)" in md and "Base (fine-tuning) − FreeLB (clean" not in md
    clean_mde = frame.loc[frame.measure == "clean", "mde80"]
    attacked_mde = frame.loc[frame.measure == "attacked", "mde80"]
    assert (
        f"; {N_EXAMPLES} examples per seed): clean accuracy {clean_mde.min():.1f}–{clean_mde.max():.1f} points; "
        f"accuracy under attack {attacked_mde.min():.1f}–{attacked_mde.max():.1f} points." in md
    )
    tex = (tmp_path / "tables" / "table_paired.tex").read_text()
    assert r"CARL $-$ FreeLB" in tex and r"\epsilon" in tex and "×" not in tex


def test_paired_bootstrap_is_reproducible_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    import carlrar.paired as paired_module

    d1 = np.array([1, 0, 0, -1, 1, 1, 0, 0, 0, 1, 0], dtype=np.int8)
    d2 = np.array([0, 0, 1, 0, -1, 0, 1], dtype=np.int8)
    rng = np.random.default_rng(7)
    i1, i2 = rng.integers(0, len(d1), size=(300, len(d1))), rng.integers(0, len(d2), size=(300, len(d2)))
    by_hand = (100 * d1[i1].mean(axis=1) + 100 * d2[i2].mean(axis=1)) / 2
    assert paired_module.paired_bootstrap([d1, d2], resamples=300, seed=7) == pytest.approx(by_hand, abs=1e-9)
    monkeypatch.setattr(paired_module, "_CHUNK_ELEMENTS", 20)  # drawn in blocks of 1-2 rows: the same numbers
    assert paired_module.paired_bootstrap([d1, d2], resamples=300, seed=7) == pytest.approx(by_hand, abs=1e-9)
    assert paired_module.paired_bootstrap([d1, d2], resamples=300, seed=8) != pytest.approx(by_hand, abs=1e-9)


def test_paired_table_matches_the_documented_procedure(tmp_path: Path) -> None:
    import numpy as np

    from carlrar.paired import paired_bootstrap, paired_frame

    metrics, summaries = _k_more_case(tmp_path)
    row = _pick(paired_frame(metrics, summaries, resamples=1000, seed=3), "carl", "freelb", "attacked")
    diffs = []
    for seed in (1, 2, 3):  # straight from the files, as a reader would
        folder = tmp_path / "attacks" / "ag_news"
        carl, freelb = (
            pd.read_parquet(folder / m / f"seed{seed}" / "records_eps0.1.parquet") for m in ("carl", "freelb")
        )
        diffs.append(
            (carl.attacked_pred == carl.gold).to_numpy(int) - (freelb.attacked_pred == freelb.gold).to_numpy(int)
        )
    replicates = paired_bootstrap(diffs, resamples=1000, seed=3)
    assert (row.ci95_low, row.ci95_high) == pytest.approx(tuple(np.percentile(replicates, [2.5, 97.5])))
    assert row.se == pytest.approx(np.std(replicates, ddof=1))


def test_paired_table_refuses_different_examples(tmp_path: Path) -> None:
    from carlrar.paired import paired_frame
    from carlrar.reporting import ReportError

    gold = [0, 1, 0, 1, 1]
    paths = [_predictions_run(tmp_path, "sst2", "freelb", 1, gold, gold)]
    paths.append(_predictions_run(tmp_path, "sst2", "carl", 1, [0, 1, 1, 1, 1], gold))
    with pytest.raises(ReportError, match=r"gold labels disagree on 1 of 5 rows \(first: row 2\)"):
        paired_frame(paths)
    paths[1] = _predictions_run(tmp_path, "sst2", "carl", 1, gold, gold, rows=[0, 1, 2, 3, 7])
    with pytest.raises(ReportError, match="evaluated on different examples"):
        paired_frame(paths)


def test_paired_table_skips_runs_without_predictions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from carlrar.paired import paired_frame

    gold = [0, 1, 0, 1]
    paths = [
        _predictions_run(tmp_path, "sst2", "freelb", 1, gold, gold),
        _predictions_run(tmp_path, "sst2", "carl", 1, gold, gold),
        metrics_file(tmp_path / "old", "sst2", "rar", 1, 0.5),  # an older run: no "predictions" key
    ]
    with caplog.at_level("WARNING"):
        frame = paired_frame(paths, resamples=100)
    assert "no 'predictions'" in caplog.text
    assert frame[["method", "reference"]].values.tolist() == [["carl", "freelb"]]


@pytest.mark.parametrize("resamples", [0, 10**9, 2.5])
def test_paired_bootstrap_sizes_beyond_its_bound_are_refused_before_reading(tmp_path: Path, resamples: float) -> None:
    """A billion resamples held 30 GB of replicates at once: the library refuses it, as the command line does."""
    from carlrar.paired import MAX_RESAMPLES, paired_bootstrap, paired_frame

    with pytest.raises(CarlrarError, match=rf"resamples {resamples!r} must be an integer from 1 to {MAX_RESAMPLES:,}"):
        paired_frame([tmp_path / "missing" / "metrics.json"], resamples=resamples)
    with pytest.raises(CarlrarError, match="must be an integer from 1"):
        paired_bootstrap([[1, 0, -1]], resamples=resamples)


def test_paired_table_cli_writes_three_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from carlrar.cli import main

    caplog.set_level("INFO")
    metrics, summaries = _k_more_case(tmp_path)
    prefix = tmp_path / "out" / "table_paired"
    args = ["paired-table", "--metrics", *map(str, metrics), "--summaries", *map(str, summaries)]
    assert main([*args, "--out", str(prefix), "--resamples", "500", "--seed", "11"]) == 0
    for ext in ("md", "csv", "tex"):
        assert prefix.with_name(f"table_paired.{ext}").stat().st_size > 0, ext
    assert set(pd.read_csv(prefix.with_name("table_paired.csv"))["bootstrap_seed"]) == {11}
    # carl is 5 points above freelb and base (clean) and 10 above freelb under attack; base equals freelb
    assert "5 comparisons, 3 with a 95 % interval excluding 0" in caplog.text


def test_figures_show_paired_differences_and_readable_distances(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import carlrar.figures as figures
    import carlrar.paired as paired_module

    metrics, summaries = _k_more_case(tmp_path)
    history = [{"step": 100 * i, "epoch": i / 2, "dev_accuracy": 0.8 + i / 100, "train_loss": 1.0} for i in range(1, 7)]
    for path in metrics:
        data = json.loads(path.read_text())
        path.write_text(json.dumps(data | {"history": history}))
    paired = paired_module.write_table_paired(metrics, summaries, tmp_path / "table_paired", resamples=300)
    saved = {}
    original = figures._save_figure
    monkeypatch.setattr(
        figures, "_save_figure", lambda fig, out, name: saved.setdefault(name, fig) and original(fig, out, name)
    )
    written = figures.write_figures(metrics, summaries, tmp_path / "figures", paired=tmp_path / "table_paired.csv")
    assert sorted(p.name for p in written) == sorted(
        f"{n}.{e}"
        for n in ("robustness_vs_epsilon", "representation_distance", "learning_curves")
        for e in ("pdf", "png")
    )
    robustness = saved["robustness_vs_epsilon"]
    difference_axis = robustness.axes[1]  # bottom row: CARL minus FreeLB, clean (x=0) and at eps 0.1
    carl = _pick(paired, "carl", "freelb"), _pick(paired, "carl", "freelb", "attacked")
    plotted = {c.get_label(): list(c.lines[0].get_ydata()) for c in difference_axis.containers}
    assert plotted == {"CARL": pytest.approx([c.difference for c in carl])}  # base (0 everywhere) is left out
    bars = difference_axis.containers[0].lines[2][0].get_segments()  # error bars span the bootstrap interval
    spans = [y for seg in bars for y in (seg[0][1], seg[1][1])]
    assert spans == pytest.approx([y for c in carl for y in (c.ci95_low, c.ci95_high)], abs=1e-3)  # csv: 3 decimals
    cosine, euclidean = saved["representation_distance"].axes[:2]  # 1 - cosine: 0.01 (FreeLB) vs 0.001 (CARL)
    assert cosine.get_xscale() == "log" and "1 − cosine" in cosine.get_title()
    assert euclidean.get_xscale() == "linear"  # 1.0 everywhere: no ratio to show
    lines = [line for ax in saved["learning_curves"].axes for line in ax.lines if len(line.get_xdata()) == 6]
    assert lines and all(line.get_marker() not in (None, "None", "") for line in lines)


def test_table2_reports_rar_reconstruction_means(tmp_path: Path) -> None:
    paths = grid(tmp_path)
    for seed, end in ((1, 0.90), (2, 0.94)):
        accuracy = {"before_warmup": 0.0, "after_warmup": 0.85, "end": end}
        paths.append(metrics_file(tmp_path, "sst2", "rar", seed, 0.9, reconstruction_dev_token_accuracy=accuracy))
    write_table2(paths, tmp_path / "t2")
    markdown = (tmp_path / "t2.md").read_text()
    assert "| SST-2     | RAR      | 2       | 0.0              | 85.0            | 92.0              |" in markdown
    assert "CARL" not in markdown.split("RAR's reconstructor")[1]  # only runs that record it
    write_table2(grid(tmp_path / "no_rar"), tmp_path / "t2b")
    assert "RAR's reconstructor" not in (tmp_path / "t2b.md").read_text()
