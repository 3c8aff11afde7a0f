"""The paper's tables from the runs' ``metrics.json`` files (Tables 2, 7) and attack summaries (Tables 4, 5, 6).

Table 2 is clean accuracy on each dataset's evaluated split (SST-2: GLUE dev; the others: test), as the mean and
standard deviation over training seeds, with each method's difference from FreeLB on the same dataset.

Rounding: means and standard deviations are rounded to 2 decimals (percent), and the difference from FreeLB is
taken between the *rounded* means, so every printed delta equals the difference of the printed numbers (as in the
paper). The standard deviation is the sample one (``ddof=1``, n - 1 in the denominator); with a single seed it is
undefined and left blank.

Tables 2, 4 and 5 also give the 95 % confidence interval of the mean over seeds (Student t with n - 1 degrees of
freedom: mean ± t(0.975, n - 1) · std / sqrt(n), from the unrounded mean and std), which says how far the mean
over this many seeds can be trusted; blank with a single seed. ``table_paired`` (:mod:`carlrar.paired`)
compares methods on the same examples: a paired bootstrap over the evaluated split's examples, within each seed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
import scipy.stats

from carlrar.errors import CarlrarError
from carlrar.registry import DATASET_IDS, METHOD_IDS, dataset_display, method_display
from carlrar.storage import read_json, write_text

REFERENCE_METHOD = "freelb"
TABLE2_COLUMNS = ["dataset", "method", "seeds", "mean", "std", "delta_vs_freelb", "ci95_low", "ci95_high"]
TABLE2_REQUIRED_KEYS = ("dataset", "method", "seed", "evaluated_split", "eval_accuracy")
CONFIDENCE = 0.95

log = logging.getLogger(__name__)


class ReportError(CarlrarError):
    """The metrics files cannot be turned into a table."""


def t_quantile(coverage: float, df: int) -> float:
    """The t with P(|T| < t) = ``coverage`` (two-sided): t(0.975, n-1) for ``coverage=0.95``."""
    if df < 1 or not 0.0 < coverage < 1.0:
        raise ValueError(f"need df >= 1 and 0 < coverage < 1, got df={df}, coverage={coverage}")
    return float(scipy.stats.t.ppf(0.5 + coverage / 2.0, df))


def t_interval(mean: float, std: float, n: int, coverage: float = CONFIDENCE) -> tuple[float, float]:
    """Confidence interval of a mean over ``n`` seeds: mean ± t · std / sqrt(n); (nan, nan) below two seeds.

    Seeds are few (often 3), so the normal 1.96 would be far too narrow: t(0.975, 2) = 4.30.
    """
    if n < 2 or math.isnan(std) or math.isnan(mean):
        return math.nan, math.nan
    half = t_quantile(coverage, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


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


def in_table_order(values: list[str], preferred: tuple[str, ...]) -> list[str]:
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
    for dataset in in_table_order(runs["dataset"].tolist(), DATASET_IDS):
        on_dataset = runs[runs["dataset"] == dataset]
        stats = {}
        for method in in_table_order(on_dataset["method"].tolist(), METHOD_IDS):
            acc = on_dataset.loc[on_dataset["method"] == method, "accuracy"].astype(float)
            std = float(acc.std(ddof=1)) if len(acc) > 1 else math.nan
            low, high = t_interval(float(acc.mean()), std, len(acc))  # from the unrounded mean and std
            stats[method] = (len(acc), round(float(acc.mean()), 2), round(std, 2), round(low, 2), round(high, 2))
        reference = stats.get(REFERENCE_METHOD)
        for method, (n, mean, std, low, high) in stats.items():
            delta = round(mean - reference[1], 2) + 0.0 if reference is not None else math.nan  # + 0.0: no -0.0
            rows.append(
                {"dataset": dataset, "method": method, "seeds": n, "mean": mean, "std": std, "delta_vs_freelb": delta}
                | {"ci95_low": low, "ci95_high": high}
            )
    frame = pd.DataFrame(rows, columns=TABLE2_COLUMNS).astype(
        {"seeds": "int64", "mean": "float64", "std": "float64", "delta_vs_freelb": "float64"}
        | {"ci95_low": "float64", "ci95_high": "float64"}
    )
    return frame, {name: split for name, (split, _) in splits.items()}


def _cell(row: pd.Series, pm: str, typical_seeds: int) -> str:
    text = f"{row['mean']:.2f}"
    if not math.isnan(row["std"]):
        text += f" {pm} {row['std']:.2f}"
    if not math.isnan(row["ci95_low"]):
        text += f" [{row['ci95_low']:.2f}, {row['ci95_high']:.2f}]"
    if row["method"] != REFERENCE_METHOD and not math.isnan(row["delta_vs_freelb"]):
        text += f" ({row['delta_vs_freelb']:+.2f})"
    if row["seeds"] != typical_seeds:
        text += f" [n={row['seeds']}]"
    return text


CI_NOTE = (
    "In brackets the 95 % confidence interval of the mean over seeds (Student t with n - 1 degrees of freedom, "
    "mean ± t(0.975, n - 1) std / sqrt(n); none with a single seed): it covers seed-to-seed variation only."
)


def _pivot(frame: pd.DataFrame, pm: str) -> tuple[pd.DataFrame, int]:
    typical = int(frame["seeds"].mode().max())
    cells = frame.assign(cell=[_cell(row, pm, typical) for _, row in frame.iterrows()])
    datasets = in_table_order(frame["dataset"].tolist(), DATASET_IDS)
    methods = in_table_order(frame["method"].tolist(), METHOD_IDS)
    wide = cells.pivot(index="method", columns="dataset", values="cell").reindex(index=methods, columns=datasets)
    wide = wide.fillna("")
    wide.index = [method_display(m) for m in methods]
    wide.index.name = "Method"
    wide.columns = [dataset_display(d) for d in datasets]
    return wide, typical


def _note(splits: dict[str, str], typical_seeds: int, uniform: bool) -> str:
    evaluated = ", ".join(f"{dataset_display(d)} {s}" for d, s in splits.items())
    return (
        f"Accuracy (%) on the evaluated split ({evaluated}): mean ± sample standard deviation over "
        f"{typical_seeds} seed{'s' if typical_seeds != 1 else ''}{'' if uniform else ' (other counts marked [n=k])'}. "
        f"{CI_NOTE} In parentheses the difference of the mean from FreeLB on the same dataset; whether such a "
        "difference is more than noise on these examples is in table_paired."
    )


def _reconstruction_section(metrics_paths: list[Path]) -> str:
    """Markdown: RAR's clean-dev token reconstruction accuracy before / after the warm-up and at the end (mean over
    seeds), from the runs that record it; empty when none does (no RAR run)."""
    rows = []
    for path in metrics_paths:
        m = read_json(path, "metrics file")
        accuracy = m.get("reconstruction_dev_token_accuracy")
        if accuracy:
            rows.append({"dataset": m["dataset"], "method": m["method"], **accuracy})
    if not rows:
        return ""
    frame = (
        pd.DataFrame(rows)
        .groupby(["dataset", "method"], sort=False)
        .agg(
            seeds=("end", "size"), before=("before_warmup", "mean"), after=("after_warmup", "mean"), end=("end", "mean")
        )
    )
    frame = frame.reset_index()
    frame["dataset"] = frame["dataset"].map(dataset_display)
    frame["method"] = frame["method"].map(method_display)
    for column in ("before", "after", "end"):
        frame[column] = frame[column].map(lambda v: f"{100 * v:.1f}")
    frame.columns = ["Dataset", "Method", "Seeds", "Before warm-up", "After warm-up", "End of training"]
    return (
        "\nRAR's reconstructor: clean dev tokens reconstructed (%, argmax of the head on clean token states, mean "
        "over seeds):\n\n" + frame.to_markdown(index=False, disable_numparse=True) + "\n"
    )


def write_table2(metrics_paths: list[Path], out_prefix: Path) -> pd.DataFrame:
    """Write Table 2 to ``PREFIX.md``, ``PREFIX.csv`` and ``PREFIX.tex`` (each atomically); return the long frame.

    The CSV is long (dataset, method, seeds, mean, std, delta_vs_freelb, ci95_low, ci95_high; blank where
    undefined); markdown and LaTeX have methods as rows and datasets as columns, cells like
    ``93.77 ± 0.12 [93.47, 94.07] (+0.54)`` (mean ± std [95 % t-interval of the mean over seeds] (vs FreeLB)).
    """
    frame, splits = table2_frame(list(metrics_paths))
    ordered_splits = {d: splits[d] for d in in_table_order(list(splits), DATASET_IDS)}
    out_prefix = Path(out_prefix)

    wide_md, typical = _pivot(frame, "±")
    note = _note(ordered_splits, typical, uniform=bool((frame["seeds"] == typical).all()))
    markdown = wide_md.to_markdown() + "\n\n" + note + "\n" + _reconstruction_section(list(metrics_paths))

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
        for d in in_table_order([d for d, _ in counts], DATASET_IDS)
        for m in in_table_order([m for dd, m in counts if dd == d], METHOD_IDS)
    ]
    frame = pd.DataFrame(rows).astype({"params": "int64", "extra_vs_base": "Int64"})
    wide = frame.pivot(index="method", columns="dataset", values="params")
    wide = wide.reindex(
        index=in_table_order(frame["method"].tolist(), METHOD_IDS),
        columns=in_table_order(frame["dataset"].tolist(), DATASET_IDS),
    )
    wide = wide.map(lambda v: "" if pd.isna(v) else f"{int(v):,}")
    wide.index = [method_display(m) for m in wide.index]
    wide.index.name = "Method"
    wide.columns = [dataset_display(d) for d in wide.columns]
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
    """Mean, sample standard deviation and 95 % t-interval over seeds of ``values`` per (dataset, method, epsilon).

    The interval columns (``<value>_ci95_low`` / ``_high``) come last, so the older columns keep their places.
    """
    grouped = frame.groupby(["dataset", "method", "epsilon"], sort=False)[values]
    raw = grouped.agg(["mean", "std"])
    stats = raw.round(digits)
    stats.columns = [f"{value}_{stat}" for value, stat in stats.columns]
    stats.insert(0, "seeds", grouped.size())
    for value in values:
        bounds = [t_interval(m, s, n) for m, s, n in zip(raw[(value, "mean")], raw[(value, "std")], stats["seeds"])]
        stats[f"{value}_ci95_low"] = [round(low, digits) for low, _ in bounds]
        stats[f"{value}_ci95_high"] = [round(high, digits) for _, high in bounds]
    stats = stats.reset_index()
    stats["dataset_rank"] = stats["dataset"].map({d: i for i, d in enumerate(DATASET_IDS)}).fillna(len(DATASET_IDS))
    stats["method_rank"] = stats["method"].map({m: i for i, m in enumerate(METHOD_IDS)}).fillna(len(METHOD_IDS))
    stats = stats.sort_values(["dataset_rank", "method_rank", "dataset", "method", "epsilon"])
    return stats.drop(columns=["dataset_rank", "method_rank"]).reset_index(drop=True)


def _mean_std(mean: float, std: float, digits: int, pm: str, low: float = math.nan, high: float = math.nan) -> str:
    """'mean ± std [low, high]', leaving out what is undefined (a single seed has neither std nor interval)."""
    if math.isnan(mean):
        return ""
    text = f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" {pm} {std:.{digits}f}")
    return text + ("" if math.isnan(low) else f" [{low:.{digits}f}, {high:.{digits}f}]")


def _per_dataset_tables(stats: pd.DataFrame, value: str, digits: int, pm: str) -> dict[str, pd.DataFrame]:
    """For each dataset: methods as rows, epsilons as columns, cells 'mean ± std [95 % t-interval]'."""
    tables = {}
    for dataset, part in stats.groupby("dataset", sort=False):
        columns = [part[f"{value}_{stat}"] for stat in ("mean", "std", "ci95_low", "ci95_high")]
        cells = part.assign(cell=[_mean_std(m, s, digits, pm, lo, hi) for m, s, lo, hi in zip(*columns)])
        wide = cells.pivot(index="method", columns="epsilon", values="cell")
        wide = wide.reindex(index=in_table_order(part["method"].tolist(), METHOD_IDS)).fillna("")
        wide.index = [method_display(m) for m in wide.index]
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
            name = dataset_display(dataset)
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
        f"word embeddings of the evaluated split. {CI_NOTE} Paired differences between methods on the same "
        "examples, with bootstrap intervals, are in table_paired."
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
        f"standard deviation over seeds. {CI_NOTE}"
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
                    "method": method_display(report["method"]),
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
        method=counts["method"].map(method_display),
        dataset=counts["dataset"].map(dataset_display),
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
