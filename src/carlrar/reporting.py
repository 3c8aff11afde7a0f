"""Result tables from the runs' ``metrics.json`` files (paper Table 2 and, later, the others).

Table 2 is clean accuracy on each dataset's evaluated split (SST-2: GLUE dev; the others: test), as the mean and
standard deviation over training seeds, with each method's difference from FreeLB on the same dataset.

Rounding: means and standard deviations are rounded to 2 decimals (percent), and the difference from FreeLB is
taken between the *rounded* means, so every printed delta equals the difference of the printed numbers (as in the
paper). The standard deviation is the sample one (``ddof=1``, n - 1 in the denominator); with a single seed it is
undefined and left blank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from carlrar.config import METHODS
from carlrar.errors import CarlrarError
from carlrar.storage import read_json, write_text

DATASET_ORDER = ("sst2", "yahoo_answers", "yelp_polarity", "ag_news")
DATASET_NAMES = {"sst2": "SST-2", "yahoo_answers": "Yahoo! Answers", "yelp_polarity": "Yelp-P", "ag_news": "AG's News"}
METHOD_ORDER = METHODS
METHOD_NAMES = {"base": "Base (fine-tuning)", "freelb": "FreeLB", "carl": "CARL", "rar": "RAR", "carl_rar": "CARL+RAR"}
REFERENCE_METHOD = "freelb"
TABLE2_COLUMNS = ["dataset", "method", "seeds", "mean", "std", "delta_vs_freelb"]
TABLE2_REQUIRED_KEYS = ("dataset", "method", "seed", "evaluated_split", "eval_accuracy")


class ReportError(CarlrarError):
    """The metrics files cannot be turned into a table."""


def _read_metrics(path: Path) -> dict[str, Any]:
    metrics = read_json(path, "metrics file")
    if not isinstance(metrics, dict):
        raise ReportError(f"{path}: expected a JSON object of metrics")
    missing = [key for key in TABLE2_REQUIRED_KEYS if key not in metrics]
    if missing:
        raise ReportError(f"{path}: missing key(s) {', '.join(repr(k) for k in missing)} needed for Table 2")
    accuracy = metrics["eval_accuracy"]
    if isinstance(accuracy, bool) or not isinstance(accuracy, int | float) or not 0.0 <= accuracy <= 1.0:
        raise ReportError(f"{path}: 'eval_accuracy' must be a number in [0, 1], got {accuracy!r}")
    if isinstance(metrics["seed"], bool) or not isinstance(metrics["seed"], int):
        raise ReportError(f"{path}: 'seed' must be an integer, got {metrics['seed']!r}")
    return metrics


def _order(values: list[str], preferred: tuple[str, ...]) -> list[str]:
    """Known names in their canonical order, then any others alphabetically."""
    present = set(values)
    return [v for v in preferred if v in present] + sorted(present.difference(preferred))


def table2_frame(metrics_paths: list[Path]) -> tuple[pd.DataFrame, dict[str, str]]:
    """Aggregate metrics files into Table 2's long format; also return each dataset's evaluated split."""
    if not metrics_paths:
        raise ReportError("no metrics files given for Table 2")
    records: list[dict[str, Any]] = []
    seen: dict[tuple[str, str, int], Path] = {}
    splits: dict[str, tuple[str, Path]] = {}
    for path in map(Path, metrics_paths):
        m = _read_metrics(path)
        key = (str(m["dataset"]), str(m["method"]), m["seed"])
        if key in seen:
            raise ReportError(
                f"two metrics files for dataset {key[0]}, method {key[1]}, seed {key[2]}: {seen[key]} and {path}"
            )
        seen[key] = path
        split = str(m["evaluated_split"])
        first = splits.setdefault(key[0], (split, path))
        if first[0] != split:
            raise ReportError(
                f"dataset {key[0]} is evaluated on '{first[0]}' in {first[1]} but on '{split}' in {path}; "
                "one table cell cannot mix splits"
            )
        records.append(
            {"dataset": key[0], "method": key[1], "seed": key[2], "accuracy": 100.0 * float(m["eval_accuracy"])}
        )

    runs = pd.DataFrame.from_records(records)
    rows = []
    for dataset in _order(runs["dataset"].tolist(), DATASET_ORDER):
        on_dataset = runs[runs["dataset"] == dataset]
        stats = {}
        for method in _order(on_dataset["method"].tolist(), METHOD_ORDER):
            acc = on_dataset.loc[on_dataset["method"] == method, "accuracy"].astype(float)
            std = float(acc.std(ddof=1)) if len(acc) > 1 else math.nan
            stats[method] = (len(acc), round(float(acc.mean()), 2), round(std, 2) if not math.isnan(std) else math.nan)
        reference = stats.get(REFERENCE_METHOD)
        for method, (n, mean, std) in stats.items():
            delta = round(mean - reference[1], 2) + 0.0 if reference is not None else math.nan  # + 0.0: no -0.0
            rows.append(
                {"dataset": dataset, "method": method, "seeds": n, "mean": mean, "std": std, "delta_vs_freelb": delta}
            )
    frame = pd.DataFrame(rows, columns=TABLE2_COLUMNS).astype(
        {"seeds": "int64", "mean": "float64", "std": "float64", "delta_vs_freelb": "float64"}
    )
    return frame, {name: split for name, (split, _) in splits.items()}


def _cell(row: pd.Series, pm: str, typical_seeds: int) -> str:
    text = f"{row['mean']:.2f}"
    if not math.isnan(row["std"]):
        text += f" {pm} {row['std']:.2f}"
    if row["method"] != REFERENCE_METHOD and not math.isnan(row["delta_vs_freelb"]):
        text += f" ({row['delta_vs_freelb']:+.2f})"
    if row["seeds"] != typical_seeds:
        text += f" [n={row['seeds']}]"
    return text


def _pivot(frame: pd.DataFrame, pm: str) -> tuple[pd.DataFrame, int]:
    typical = int(frame["seeds"].mode().max())
    cells = frame.assign(cell=[_cell(row, pm, typical) for _, row in frame.iterrows()])
    datasets = _order(frame["dataset"].tolist(), DATASET_ORDER)
    methods = _order(frame["method"].tolist(), METHOD_ORDER)
    wide = cells.pivot(index="method", columns="dataset", values="cell").reindex(index=methods, columns=datasets)
    wide = wide.fillna("")
    wide.index = [METHOD_NAMES.get(m, m) for m in methods]
    wide.index.name = "Method"
    wide.columns = [DATASET_NAMES.get(d, d) for d in datasets]
    return wide, typical


def _note(splits: dict[str, str], typical_seeds: int, uniform: bool) -> str:
    evaluated = ", ".join(f"{DATASET_NAMES.get(d, d)} {s}" for d, s in splits.items())
    return (
        f"Accuracy (%) on the evaluated split ({evaluated}): mean ± sample standard deviation over "
        f"{typical_seeds} seed{'s' if typical_seeds != 1 else ''}{'' if uniform else ' (other counts marked [n=k])'}; "
        "in parentheses the difference of the mean from FreeLB on the same dataset."
    )


def write_table2(metrics_paths: list[Path], out_prefix: Path) -> pd.DataFrame:
    """Write Table 2 to ``PREFIX.md``, ``PREFIX.csv`` and ``PREFIX.tex`` (each atomically); return the long frame.

    The CSV is long (dataset, method, seeds, mean, std, delta_vs_freelb; blank where undefined); markdown and
    LaTeX have methods as rows and datasets as columns, cells like ``93.77 ± 0.12 (+0.54)``.
    """
    frame, splits = table2_frame(list(metrics_paths))
    ordered_splits = {d: splits[d] for d in _order(list(splits), DATASET_ORDER)}
    out_prefix = Path(out_prefix)

    wide_md, typical = _pivot(frame, "±")
    note = _note(ordered_splits, typical, uniform=bool((frame["seeds"] == typical).all()))
    markdown = wide_md.to_markdown() + "\n\n" + note + "\n"

    wide_tex, _ = _pivot(frame, r"$\pm$")
    wide_tex.index.name = None
    wide_tex = wide_tex.rename(index=lambda name: name.replace("&", r"\&"))
    latex = wide_tex.to_latex(
        escape=False,
        column_format="l" + "c" * len(wide_tex.columns),
        caption=note.replace("±", r"$\pm$").replace("%", r"\%"),
        label="tab:accuracy",
    )

    csv = frame.to_csv(index=False, float_format="%.2f", lineterminator="\n")

    suffix = out_prefix.name
    write_text(out_prefix.with_name(f"{suffix}.csv"), csv)
    write_text(out_prefix.with_name(f"{suffix}.md"), markdown)
    write_text(out_prefix.with_name(f"{suffix}.tex"), latex)
    return frame


def write_table7(metrics_paths: list[Path], out_prefix: Path) -> pd.DataFrame:
    """Table 7: trainable parameters per method (and dataset: the classifier's width follows the classes).

    Counts come from the finished runs (``params`` in metrics.json, tied weights counted once), so the table
    describes the models that were actually trained. Writes ``PREFIX.md`` and ``PREFIX.csv``.
    """
    counts: dict[tuple[str, str], int] = {}
    for path in map(Path, metrics_paths):
        m = read_json(path, "metrics file")
        try:
            key, params = (str(m["dataset"]), str(m["method"])), int(m["params"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"{path}: cannot read 'dataset', 'method' and 'params' for Table 7 ({exc})") from None
        if counts.setdefault(key, params) != params:
            raise ReportError(
                f"{path}: {params:,} parameters, but another seed of {key[0]}/{key[1]} has {counts[key]:,}"
            )
    if not counts:
        raise ReportError("no metrics files given for Table 7")
    rows = [
        {
            "dataset": d,
            "method": m,
            "params": counts[(d, m)],
            "extra_vs_base": counts[(d, m)] - counts[(d, "base")] if (d, "base") in counts else None,
        }
        for d in _order([d for d, _ in counts], DATASET_ORDER)
        for m in _order([m for dd, m in counts if dd == d], METHOD_ORDER)
    ]
    frame = pd.DataFrame(rows).astype({"params": "int64", "extra_vs_base": "Int64"})
    wide = frame.pivot(index="method", columns="dataset", values="params")
    wide = wide.reindex(
        index=_order(frame["method"].tolist(), METHOD_ORDER), columns=_order(frame["dataset"].tolist(), DATASET_ORDER)
    )
    wide = wide.map(lambda v: "" if pd.isna(v) else f"{int(v):,}")
    wide.index = [METHOD_NAMES.get(m, m) for m in wide.index]
    wide.index.name = "Method"
    wide.columns = [DATASET_NAMES.get(d, d) for d in wide.columns]
    note = "Trainable parameters of the trained models (tied weights counted once)."
    out_prefix = Path(out_prefix)
    write_text(out_prefix.with_name(f"{out_prefix.name}.csv"), frame.to_csv(index=False, lineterminator="\n"))
    write_text(out_prefix.with_name(f"{out_prefix.name}.md"), wide.to_markdown() + "\n\n" + note + "\n")
    return frame


# --- robustness: Tables 4, 5 and 6 from attack summaries ----------------------------------------------------------


def attack_frame(summary_paths: list[Path]) -> pd.DataFrame:
    """One row per (dataset, method, seed, epsilon) from ``carlrar attack`` summaries, accuracies in percent."""
    rows = []
    for path in map(Path, summary_paths):
        summary = read_json(path, "attack summary")
        try:
            for entry in summary["epsilons"].values():
                rows.append(
                    {
                        "dataset": summary["dataset"],
                        "method": summary["method"],
                        "seed": summary["seed"],
                        "epsilon": float(entry["epsilon"]),
                        "clean_accuracy": 100.0 * entry["clean_accuracy"],
                        "attacked_accuracy": 100.0 * entry["attacked_accuracy"],
                        "attack_success_rate": math.nan
                        if entry["attack_success_rate"] is None
                        else 100.0 * entry["attack_success_rate"],
                        "mean_cosine": entry["mean_cosine"],
                        "mean_euclidean": entry["mean_euclidean"],
                    }
                )
        except (KeyError, TypeError) as exc:
            raise ReportError(f"{path}: not a 'carlrar attack' summary (missing {exc})") from None
    if not rows:
        raise ReportError("no attack summaries given")
    frame = pd.DataFrame(rows)
    duplicated = frame.duplicated(["dataset", "method", "seed", "epsilon"])
    if duplicated.any():
        first = frame[duplicated].iloc[0]
        raise ReportError(f"two attack summaries for {first['dataset']}/{first['method']}/seed {first['seed']}")
    return frame


def _over_seeds(frame: pd.DataFrame, values: list[str], digits: int) -> pd.DataFrame:
    """Mean and sample standard deviation over seeds of ``values`` per (dataset, method, epsilon)."""
    grouped = frame.groupby(["dataset", "method", "epsilon"], sort=False)[values]
    stats = grouped.agg(["mean", "std"]).round(digits)
    stats.columns = [f"{value}_{stat}" for value, stat in stats.columns]
    stats.insert(0, "seeds", grouped.size())
    stats = stats.reset_index()
    stats["dataset_rank"] = stats["dataset"].map({d: i for i, d in enumerate(DATASET_ORDER)}).fillna(len(DATASET_ORDER))
    stats["method_rank"] = stats["method"].map({m: i for i, m in enumerate(METHOD_ORDER)}).fillna(len(METHOD_ORDER))
    stats = stats.sort_values(["dataset_rank", "method_rank", "dataset", "method", "epsilon"])
    return stats.drop(columns=["dataset_rank", "method_rank"]).reset_index(drop=True)


def _mean_std(mean: float, std: float, digits: int, pm: str) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" {pm} {std:.{digits}f}")


def _per_dataset_tables(stats: pd.DataFrame, value: str, digits: int, pm: str) -> dict[str, pd.DataFrame]:
    """For each dataset: methods as rows, epsilons as columns, cells 'mean ± std'."""
    tables = {}
    for dataset, part in stats.groupby("dataset", sort=False):
        cells = part.assign(
            cell=[_mean_std(m, s, digits, pm) for m, s in zip(part[f"{value}_mean"], part[f"{value}_std"])]
        )
        wide = cells.pivot(index="method", columns="epsilon", values="cell")
        wide = wide.reindex(index=_order(part["method"].tolist(), METHOD_ORDER)).fillna("")
        wide.index = [METHOD_NAMES.get(m, m) for m in wide.index]
        wide.index.name = "Method"
        wide.columns = [f"ε={eps:g}" for eps in wide.columns]
        tables[dataset] = wide
    return tables


def _write_sectioned(
    out_prefix: Path, stats: pd.DataFrame, blocks: list[tuple[str, int, str]], note: str, caption: str, label: str
) -> None:
    """Write PREFIX.csv (long) and PREFIX.md / PREFIX.tex with one section per dataset and per value."""
    markdown, latex = [], []
    for value, digits, title in blocks:
        md_tables = _per_dataset_tables(stats, value, digits, "±")
        tex_tables = _per_dataset_tables(stats, value, digits, r"$\pm$")
        for dataset, table in md_tables.items():
            name = DATASET_NAMES.get(dataset, dataset)
            markdown.append(f"### {name}: {title}\n\n{table.to_markdown()}\n")
            tex = tex_tables[dataset]
            tex.index.name = None
            tex.columns = [c.replace("ε", r"$\epsilon$") for c in tex.columns]
            latex.append(
                tex.rename(index=lambda n: n.replace("&", r"\&")).to_latex(
                    escape=False,
                    column_format="l" + "c" * len(tex.columns),
                    caption=f"{caption} {name}: {title}.",
                    label=f"{label}:{dataset}:{value}",
                )
            )
    out_prefix = Path(out_prefix)
    write_text(out_prefix.with_name(f"{out_prefix.name}.csv"), stats.to_csv(index=False, lineterminator="\n"))
    write_text(out_prefix.with_name(f"{out_prefix.name}.md"), "\n".join(markdown) + "\n" + note + "\n")
    write_text(out_prefix.with_name(f"{out_prefix.name}.tex"), "\n".join(latex))


def write_table5(summary_paths: list[Path], out_prefix: Path) -> pd.DataFrame:
    """Table 5: accuracy under k-PGD attack per epsilon (the paper's AG's News; here every attacked dataset)."""
    stats = _over_seeds(attack_frame(summary_paths), ["clean_accuracy", "attacked_accuracy", "attack_success_rate"], 2)
    note = (
        "Accuracy under attack = correct after attack / all examples; attack success rate = flipped / originally "
        "correct (TextAttack's definitions), in %, mean ± sample standard deviation over seeds; l2 k-PGD on the "
        "word embeddings of the evaluated split."
    )
    _write_sectioned(
        out_prefix,
        stats,
        [("attacked_accuracy", 2, "accuracy under attack (%)"), ("attack_success_rate", 2, "attack success rate (%)")],
        note,
        "Robustness under k-PGD,",
        "tab:robustness",
    )
    return stats


def write_table4(summary_paths: list[Path], out_prefix: Path) -> pd.DataFrame:
    """Table 4: cosine similarity and Euclidean distance between clean and attacked sentence representations."""
    stats = _over_seeds(attack_frame(summary_paths), ["mean_cosine", "mean_euclidean"], 3)
    note = (
        "Mean over the evaluated split of the cosine similarity and the Euclidean distance between the sentence "
        "representations R of the clean input and R_adv of its k-PGD attack with maximum norm ε; mean ± sample "
        "standard deviation over seeds."
    )
    _write_sectioned(
        out_prefix,
        stats,
        [("mean_cosine", 3, "cosine similarity"), ("mean_euclidean", 3, "Euclidean distance")],
        note,
        "Representation distance,",
        "tab:representation",
    )
    return stats


def write_table6(sample_paths: list[Path], out_prefix: Path, examples_per_run: int = 3) -> pd.DataFrame:
    """Table 6: text-form adversarial samples decoded by RAR's reconstructor, counted per run, with examples."""
    rows, examples = [], []
    for path in map(Path, sample_paths):
        report = read_json(path, "samples report")
        try:
            rows.append(
                {
                    "dataset": report["dataset"],
                    "method": report["method"],
                    "seed": report["seed"],
                    "examples": report["n_examples"],
                    "changed": report["n_changed"],
                    "fool_base": report["n_fool_base"],
                }
            )
            chosen = [e for e in report["examples"] if e["fools_base"]][:examples_per_run]
        except (KeyError, TypeError) as exc:
            raise ReportError(f"{path}: not a 'carlrar samples' report (missing {exc})") from None
        label_names = report.get("label_names") or []

        def name(label: int, names: list[str] = label_names) -> str:
            return names[label] if names else str(label)

        for e in chosen:
            examples.append(
                {
                    "method": METHOD_NAMES.get(report["method"], report["method"]),
                    "seed": report["seed"],
                    "original": e["original"],
                    "base on original": name(e["base_pred_original"]),
                    "decoded": e["decoded"],
                    "base on decoded": name(e["base_pred_decoded"]),
                }
            )
    if not rows:
        raise ReportError("no samples reports given for Table 6")
    counts = pd.DataFrame(rows).sort_values(["dataset", "method", "seed"]).reset_index(drop=True)
    counts_md = counts.assign(
        method=counts["method"].map(lambda m: METHOD_NAMES.get(m, m)),
        dataset=counts["dataset"].map(lambda d: DATASET_NAMES.get(d, d)),
    )
    markdown = (
        "Decoded sentences that differ from the original (`changed`) and, of those, the ones the base model of "
        "the same seed classifies correctly in the original but wrongly in the decoded form (`fool_base`).\n\n"
        + counts_md.to_markdown(index=False)
        + "\n"
    )
    if examples:
        markdown += "\n" + pd.DataFrame(examples).to_markdown(index=False) + "\n"
    else:
        markdown += "\nNo decoded sentence fooled the base model in these runs.\n"
    latex = counts_md.to_latex(
        index=False, caption="Text-form adversarial samples from RAR's reconstructor.", label="tab:samples"
    )
    out_prefix = Path(out_prefix)
    write_text(out_prefix.with_name(f"{out_prefix.name}.csv"), counts.to_csv(index=False, lineterminator="\n"))
    write_text(out_prefix.with_name(f"{out_prefix.name}.md"), markdown)
    write_text(out_prefix.with_name(f"{out_prefix.name}.tex"), latex)
    return counts


# --- figures ---------------------------------------------------------------------------------------------------


def _save_figure(grid: Any, out_dir: Path, name: str) -> list[Path]:
    """Save a seaborn grid as PDF and PNG, each atomically."""
    from carlrar.storage import atomic_path

    paths = []
    for ext in ("pdf", "png"):
        path = out_dir / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            grid.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths


def write_figures(metrics_paths: list[Path], summary_paths: list[Path], out_dir: Path) -> list[Path]:
    """Accuracy under attack against epsilon, representation distance, and dev-accuracy learning curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    out_dir = Path(out_dir)
    written: list[Path] = []
    names = {"method": lambda m: METHOD_NAMES.get(m, m), "dataset": lambda d: DATASET_NAMES.get(d, d)}

    attacks = attack_frame(summary_paths)
    clean = attacks.groupby(["dataset", "method", "seed"], as_index=False)["clean_accuracy"].first()
    curve = pd.concat(
        [
            clean.rename(columns={"clean_accuracy": "accuracy"}).assign(epsilon=0.0),
            attacks.rename(columns={"attacked_accuracy": "accuracy"})[
                ["dataset", "method", "seed", "epsilon", "accuracy"]
            ],
        ]
    )
    curve = curve.drop_duplicates(["dataset", "method", "seed", "epsilon"]).assign(
        **{k: curve[k].map(f) for k, f in names.items()}
    )
    hue_order = [METHOD_NAMES.get(m, m) for m in _order(attacks["method"].tolist(), METHOD_ORDER)]
    grid = sns.relplot(
        data=curve,
        x="epsilon",
        y="accuracy",
        hue="method",
        hue_order=hue_order,
        col="dataset",
        kind="line",
        marker="o",
        errorbar="sd",
        height=3,
        aspect=1.2,
        facet_kws={"sharey": False},
    )
    grid.set_axis_labels("ε (l2 radius of k-PGD)", "accuracy under attack (%)")
    written += _save_figure(grid, out_dir, "robustness_vs_epsilon")
    plt.close(grid.figure)

    distances = attacks.melt(
        id_vars=["dataset", "method", "seed", "epsilon"],
        value_vars=["mean_cosine", "mean_euclidean"],
        var_name="measure",
        value_name="value",
    )
    distances["measure"] = distances["measure"].map(
        {"mean_cosine": "cosine similarity", "mean_euclidean": "Euclidean distance"}
    )
    distances = distances.assign(**{k: distances[k].map(f) for k, f in names.items()})
    grid = sns.catplot(
        data=distances,
        x="method",
        y="value",
        hue="epsilon",
        order=hue_order,
        row="measure",
        col="dataset",
        kind="bar",
        errorbar="sd",
        height=2.8,
        aspect=1.3,
        sharey=False,
    )
    grid.set_axis_labels("", "")
    grid.set_titles("{row_name} | {col_name}")
    written += _save_figure(grid, out_dir, "representation_distance")
    plt.close(grid.figure)

    history = []
    for path in map(Path, metrics_paths):
        m = read_json(path, "metrics file")
        history += [
            {
                "dataset": m["dataset"],
                "method": m["method"],
                "seed": m["seed"],
                "epoch": h["epoch"],
                "dev accuracy (%)": 100.0 * h["dev_accuracy"],
            }
            for h in m.get("history", [])
        ]
    if history:
        frame = pd.DataFrame(history)
        frame = frame.assign(**{k: frame[k].map(f) for k, f in names.items()})
        grid = sns.relplot(
            data=frame,
            x="epoch",
            y="dev accuracy (%)",
            hue="method",
            hue_order=hue_order,
            col="dataset",
            kind="line",
            errorbar="sd",
            height=3,
            aspect=1.2,
            facet_kws={"sharey": False, "sharex": False},
        )
        written += _save_figure(grid, out_dir, "learning_curves")
        plt.close(grid.figure)
    return written
