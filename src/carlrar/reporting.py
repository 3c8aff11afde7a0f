"""Result tables from the runs' ``metrics.json`` files (paper Table 2 and, later, the others).

Table 2 is clean accuracy on each dataset's evaluated split (SST-2: GLUE dev; the others: test), as the mean and
standard deviation over training seeds, with each method's difference from FreeLB on the same dataset.

Rounding: means and standard deviations are rounded to 2 decimals (percent), and the difference from FreeLB is
taken between the *rounded* means, so every printed delta equals the difference of the printed numbers (as in the
paper). The standard deviation is the sample one (``ddof=1``, n - 1 in the denominator); with a single seed it is
undefined and left blank.

Tables 2, 4 and 5 also give the 95 % confidence interval of the mean over seeds (Student t with n - 1 degrees of
freedom: mean ± t(0.975, n - 1) · std / sqrt(n), from the unrounded mean and std), which says how far the mean
over this many seeds can be trusted; blank with a single seed. ``table_paired`` (:func:`write_table_paired`)
compares methods on the same examples: a paired bootstrap over the evaluated split's examples, within each seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
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
    for dataset in _order(runs["dataset"].tolist(), DATASET_IDS):
        on_dataset = runs[runs["dataset"] == dataset]
        stats = {}
        for method in _order(on_dataset["method"].tolist(), METHOD_IDS):
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
    datasets = _order(frame["dataset"].tolist(), DATASET_IDS)
    methods = _order(frame["method"].tolist(), METHOD_IDS)
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
    ordered_splits = {d: splits[d] for d in _order(list(splits), DATASET_IDS)}
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
        for d in _order([d for d, _ in counts], DATASET_IDS)
        for m in _order([m for dd, m in counts if dd == d], METHOD_IDS)
    ]
    frame = pd.DataFrame(rows).astype({"params": "int64", "extra_vs_base": "Int64"})
    wide = frame.pivot(index="method", columns="dataset", values="params")
    wide = wide.reindex(
        index=_order(frame["method"].tolist(), METHOD_IDS), columns=_order(frame["dataset"].tolist(), DATASET_IDS)
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
        wide = wide.reindex(index=_order(part["method"].tolist(), METHOD_IDS)).fillna("")
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


# --- paired comparisons: table_paired from per-example predictions and attack records ---------------------------

PAIRED_REFERENCES = ("freelb", "base")  # every method is compared with each of these that ran on the dataset
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 2021
MDE_Z = 1.96 + 0.84  # two-sided alpha = 0.05 plus 80 % power
_CHUNK_ELEMENTS = 1 << 21  # resampled indices held at once (16 MiB as int64), whatever the split's size
PAIRED_COLUMNS = [
    "dataset",
    "method",
    "reference",
    "measure",
    "epsilon",
    "seeds",
    "examples",
    "method_accuracy",
    "reference_accuracy",
    "difference",
    "ci95_low",
    "ci95_high",
    "se",
    "p_value",
    "mde80",
    "resamples",
    "bootstrap_seed",
]
_Outcomes = dict[tuple[str, str, float | None], dict[tuple[str, int], pd.DataFrame]]


def _read_outcomes(path: Path, prediction: str, where: str) -> pd.DataFrame:
    """Per-example ``row``, ``gold`` and ``correct`` (``prediction == gold``), sorted by row."""
    if not path.is_file():
        raise ReportError(f"{where}: per-example file {path} not found")
    frame = pd.read_parquet(path)
    missing = [c for c in ("row", "gold", prediction) if c not in frame.columns]
    if missing:
        raise ReportError(f"{path}: missing column(s) {', '.join(missing)}")
    if frame["row"].duplicated().any():
        raise ReportError(f"{path}: a row appears twice")
    frame = frame.sort_values("row", kind="stable").reset_index(drop=True)
    return pd.DataFrame({"row": frame["row"], "gold": frame["gold"], "correct": frame[prediction] == frame["gold"]})


def _add_outcome(
    outcomes: _Outcomes, key: tuple[str, str, float | None], run: tuple[str, int], frame: Any, where: Any
) -> None:
    """Store one run's outcomes for one measure; two files for the same run and measure are an error."""
    if run in outcomes.setdefault(key, {}):
        raise ReportError(f"{where}: a second file for {key[0]}/{run[0]}/seed {run[1]} ({key[1]})")
    outcomes[key][run] = frame


def _clean_outcomes(metrics_paths: Sequence[Path], outcomes: _Outcomes) -> None:
    """Clean correctness per example from each run's eval_predictions.parquet (beside metrics.json)."""
    for path in map(Path, metrics_paths):
        m = read_json(path, "metrics file")
        if not m.get("predictions"):
            log.warning("%s has no 'predictions' (an older run): no paired clean comparison for it", path)
            continue
        frame = _read_outcomes(path.parent / m["predictions"], "pred", str(path))
        _add_outcome(outcomes, (str(m["dataset"]), "clean", None), (str(m["method"]), int(m["seed"])), frame, path)


def _attacked_outcomes(summary_paths: Sequence[Path], outcomes: _Outcomes) -> None:
    """Correctness under attack per example and epsilon from each attack's records_eps*.parquet."""
    for path in map(Path, summary_paths):
        summary = read_json(path, "attack summary")
        try:
            dataset, run = str(summary["dataset"]), (str(summary["method"]), int(summary["seed"]))
            entries = list(summary["epsilons"].values())
        except (KeyError, TypeError, AttributeError) as exc:
            raise ReportError(f"{path}: not a 'carlrar attack' summary ({exc})") from None
        for entry in entries:
            if not entry.get("records"):
                log.warning("%s: no per-example records for eps=%s: no paired comparison", path, entry.get("epsilon"))
                continue
            frame = _read_outcomes(path.parent / entry["records"], "attacked_pred", str(path))
            _add_outcome(outcomes, (dataset, "attacked", float(entry["epsilon"])), run, frame, path)


def _paired_difference(method: pd.DataFrame, reference: pd.DataFrame, where: str) -> np.ndarray:
    """Per-example correct(method) - correct(reference), in row order, after checking the examples are the same."""
    if len(method) != len(reference) or not np.array_equal(method["row"].to_numpy(), reference["row"].to_numpy()):
        raise ReportError(
            f"{where}: the two runs were evaluated on different examples ({len(method)} vs {len(reference)} rows, "
            "or different row numbers); a paired comparison needs the same evaluated split"
        )
    disagree = method["gold"].to_numpy() != reference["gold"].to_numpy()
    if disagree.any():
        first = int(method["row"].to_numpy()[disagree][0])
        raise ReportError(
            f"{where}: gold labels disagree on {int(disagree.sum())} of {len(method)} rows (first: row {first}); "
            "the two runs were evaluated on different examples"
        )
    return method["correct"].to_numpy(np.int8) - reference["correct"].to_numpy(np.int8)


def _bootstrap_pooled(differences: Sequence[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """Bootstrap replicates [B, C] of C comparisons that share seeds and split sizes (so, the resampled rows).

    ``differences[s]`` is [C, n_s]: seed s's per-example differences. One fresh ``default_rng(seed)``; for each
    seed in order ``rng.integers(0, n_s, size=(B, n_s))`` (drawn in row blocks: the same numbers, bounded memory);
    a replicate is the mean over seeds of 100 * mean(d_s[resampled rows]). Counting how often each row is drawn
    and multiplying by the differences gives all C comparisons from one draw (and is faster than gathering).
    """
    rng = np.random.default_rng(seed)
    pooled = np.zeros((resamples, differences[0].shape[0]))
    for d in differences:
        n = d.shape[1]
        per_row = d.T.astype(np.float64) * (100.0 / n)  # [n, C]
        block = max(1, _CHUNK_ELEMENTS // n)
        for start in range(0, resamples, block):
            b = min(block, resamples - start)
            index = rng.integers(0, n, size=(b, n))
            counts = np.bincount((index + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
            pooled[start : start + b] += counts @ per_row
    return pooled / len(differences)


def paired_bootstrap(
    differences: Sequence[np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> np.ndarray:
    """Bootstrap distribution [B] of the seed-averaged accuracy difference (points) of one paired comparison.

    ``differences``: per seed (in ascending seed order), the per-example ``correct(method) - correct(reference)``
    in row order. Replicate b is ``mean_s 100 * mean(d_s[I_s[b]])`` with ``I_s = rng.integers(0, n_s, (B, n_s))``
    drawn seed after seed from ``np.random.default_rng(seed)``: resampling examples, not seeds, because the
    question is whether the difference on *these* models survives another draw of the test examples.
    """
    if not differences:
        raise ReportError("a paired bootstrap needs at least one seed")
    return _bootstrap_pooled([np.asarray(d)[None, :] for d in differences], resamples, seed)[:, 0]


def _bootstrap_stats(replicates: np.ndarray) -> dict[str, float]:
    """Percentile 95 % interval, SE, two-sided percentile p-value and the 80 %-power MDE of one comparison."""
    b = len(replicates)
    low, high = np.percentile(replicates, [2.5, 97.5])
    se = float(np.std(replicates, ddof=1))
    below, above = int((replicates <= 0).sum()), int((replicates >= 0).sum())
    p = min(1.0, 2.0 * min(below + 1, above + 1) / (b + 1))
    return {"ci95_low": float(low), "ci95_high": float(high), "se": se, "p_value": p, "mde80": MDE_Z * se}


def _comparisons(outcomes: _Outcomes) -> list[dict[str, Any]]:
    """Every (measure, method, reference) with seeds in common: per-seed differences and the point estimates."""
    found = []
    for (dataset, measure, epsilon), runs in outcomes.items():
        methods = {m for m, _ in runs}
        for reference in (r for r in PAIRED_REFERENCES if r in methods):
            for method in sorted(methods - {reference}):
                seeds = sorted({s for m, s in runs if m == method} & {s for m, s in runs if m == reference})
                if not seeds:
                    log.warning("%s/%s vs %s (%s): no seed in common, skipped", dataset, method, reference, measure)
                    continue
                where = f"{dataset} {measure}{'' if epsilon is None else f' eps={epsilon:g}'}: {method} vs {reference}"
                diffs = [
                    _paired_difference(runs[(method, s)], runs[(reference, s)], f"{where}, seed {s}") for s in seeds
                ]
                accuracy = {
                    name: float(np.mean([100.0 * runs[(name, s)]["correct"].mean() for s in seeds]))
                    for name in (method, reference)
                }
                found.append(
                    {"dataset": dataset, "method": method, "reference": reference, "measure": measure}
                    | {"epsilon": math.nan if epsilon is None else epsilon, "seeds": len(seeds), "_seeds": seeds}
                    | {"examples": min(len(d) for d in diffs), "_diffs": diffs}
                    | {"method_accuracy": accuracy[method], "reference_accuracy": accuracy[reference]}
                    | {"difference": float(np.mean([100.0 * d.mean() for d in diffs]))}
                )
    return found


def _sort_paired(frame: pd.DataFrame) -> pd.DataFrame:
    """Datasets and methods in canonical order, FreeLB's comparisons first, clean before attacks by epsilon."""
    ranks = {
        "dataset": {d: i for i, d in enumerate(DATASET_IDS)},
        "reference": {r: i for i, r in enumerate(PAIRED_REFERENCES)},
        "method": {m: i for i, m in enumerate(METHOD_IDS)},
        "measure": {"clean": 0, "attacked": 1},
    }
    keys = {f"_{c}": frame[c].map(r).fillna(len(r)) for c, r in ranks.items()}
    order = ["_dataset", "dataset", "_reference", "_method", "method", "_measure", "epsilon"]
    return frame.assign(**keys).sort_values(order).drop(columns=list(keys)).reset_index(drop=True)


def paired_frame(
    metrics_paths: Sequence[Path],
    summary_paths: Sequence[Path] = (),
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """Paired differences of every method from FreeLB and from base, clean and per attack epsilon (unrounded).

    See :func:`write_table_paired` for the procedure. Comparisons with the same seeds and split sizes share their
    resampled rows (each comparison's draw starts from a fresh generator), so they are bootstrapped together.
    """
    outcomes: _Outcomes = {}
    _clean_outcomes(metrics_paths, outcomes)
    _attacked_outcomes(summary_paths, outcomes)
    found = _comparisons(outcomes)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in found:
        groups.setdefault(tuple((s, len(d)) for s, d in zip(c["_seeds"], c["_diffs"])), []).append(c)
    for group in groups.values():
        stacked = [np.stack([c["_diffs"][i] for c in group]) for i in range(len(group[0]["_diffs"]))]
        replicates = _bootstrap_pooled(stacked, resamples, seed)
        for column, c in enumerate(group):
            c.update(_bootstrap_stats(replicates[:, column]), resamples=resamples, bootstrap_seed=seed)
    frame = pd.DataFrame([{k: v for k, v in c.items() if not k.startswith("_")} for c in found], columns=PAIRED_COLUMNS)
    return _sort_paired(frame) if len(frame) else frame


PAIRED_NOTE = (
    "Paired comparison on the same examples: difference in accuracy (points, method minus reference; clean: "
    "eval_predictions.parquet, under attack: attacked_pred of records_eps*.parquet) = mean over the seeds both "
    "methods ran of the per-seed difference. 95 % CI: paired bootstrap over examples, B = {b:,} resamples, "
    "numpy default_rng({seed}) created afresh per comparison; per seed in ascending order, "
    "rng.integers(0, n, size=(B, n)) draws the same rows for both methods (paired by `row`), each resample's "
    "difference of accuracies is averaged over the seeds, and the 2.5th/97.5th percentiles (numpy linear) of the "
    "B averages are the interval. It reflects the finite test set for these trained models, not seed-to-seed "
    "variation (Table 2's intervals). p: two-sided bootstrap p-value, min(1, 2 min(#(d* <= 0) + 1, "
    "#(d* >= 0) + 1) / (B + 1)), so 2 / (B + 1) is the smallest possible; * marks intervals that exclude 0. "
    "MDE: the smallest difference detectable with 80 % power at alpha 0.05 on this many examples, "
    "(1.96 + 0.84) × SE, SE the standard deviation of the B resampled differences."
)


def _measure_name(measure: str, epsilon: float) -> str:
    return "clean" if measure == "clean" else f"under attack, ε={epsilon:g}"


def _paired_display(part: pd.DataFrame, tex: bool) -> pd.DataFrame:
    """One dataset's comparisons as readable rows (signed points, interval, p, MDE, seeds × examples)."""
    minus, eps, pct, times = (" $-$ ", r"$\epsilon$", r"\%", r"$\times$") if tex else (" − ", "ε", "%", "×")
    rows = []
    for r in part.itertuples():
        star = "*" if r.ci95_low > 0 or r.ci95_high < 0 else ""
        method, reference = (method_display(m) for m in (r.method, r.reference))
        rows.append(
            {
                "Comparison": f"{method}{minus}{reference}",
                "Accuracy": _measure_name(r.measure, r.epsilon).replace("ε", eps),
                f"Method / reference ({pct})": f"{r.method_accuracy:.2f} / {r.reference_accuracy:.2f}",
                "Difference (points)": f"{r.difference:+.2f}{star}",
                f"95 {pct} CI": f"[{r.ci95_low:+.2f}, {r.ci95_high:+.2f}]",
                "p": f"{r.p_value:.4f}",
                f"MDE (80 {pct} power)": f"{r.mde80:.2f}",
                f"Seeds {times} examples": f"{r.seeds} {times} {r.examples:,}",
            }
        )
    return pd.DataFrame(rows)


def _power_line(part: pd.DataFrame) -> str:
    """One sentence per dataset: the range of the smallest detectable differences (MDE), clean and under attack."""
    ranges = []
    for measure, label in (("clean", "clean accuracy"), ("attacked", "accuracy under attack")):
        mde = part.loc[part["measure"] == measure, "mde80"]
        if len(mde):
            ranges.append(f"{label} {mde.min():.1f}–{mde.max():.1f} points")
    examples = ", ".join(str(n) for n in sorted(part["examples"].unique()))
    return (
        f"Smallest difference detectable at this size (MDE, 80 % power, alpha 0.05; {examples} examples per seed): "
        + "; ".join(ranges)
        + "."
    )


def _excluding_zero_line(part: pd.DataFrame) -> str:
    """One sentence per dataset: the comparisons whose 95 % interval excludes 0 (FreeLB as reference first)."""
    found = part[(part["ci95_low"] > 0) | (part["ci95_high"] < 0)]
    if found.empty:
        return "No difference's 95 % interval excludes 0: every comparison here is within test-set noise."
    items = [
        f"{method_display(row.method)} − {method_display(row.reference)} "
        f"({_measure_name(row.measure, row.epsilon)}, {row.difference:+.2f})"
        for row in found.itertuples()
    ]
    return f"95 % interval excludes 0 ({len(found)} of {len(part)} comparisons): " + "; ".join(items) + "."


def write_table_paired(
    metrics_paths: Sequence[Path],
    summary_paths: Sequence[Path],
    out_prefix: Path,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """``table_paired``: is a method's accuracy difference from FreeLB (and base) larger than test-set noise?

    Procedure, reproducible by hand from the per-example files, for each dataset, measure (clean accuracy from
    each run's ``eval_predictions.parquet``; accuracy under attack at each epsilon from ``records_eps<eps>.parquet``,
    correct = ``attacked_pred == gold``), method M and reference R in (FreeLB, base), R present, M != R:

    1. S = the seeds with files for both M and R, ascending. For each s in S join M's and R's files on ``row``:
       the rows must be the same and the gold labels must agree (else ReportError: different examples);
       d_s = correct_M - correct_R per example in row order (n_s values in {-1, 0, 1}).
    2. Point estimate: mean over s of 100 * mean(d_s).
    3. rng = numpy.random.default_rng(seed), fresh for each comparison; for s in S in order,
       I_s = rng.integers(0, n_s, size=(B, n_s)); replicate b = mean over s of 100 * mean(d_s[I_s[b]]).
       Both methods get the same resampled rows (the pairing); seeds are averaged, not resampled.
    4. 95 % CI = numpy.percentile(replicates, [2.5, 97.5]); SE = std(replicates, ddof=1); MDE (80 % power, two-sided
       alpha 0.05) = (1.96 + 0.84) * SE; p = min(1, 2 * min(#(rep <= 0) + 1, #(rep >= 0) + 1) / (B + 1)).

    Writes ``PREFIX.csv`` (long, one row per comparison, with ``resamples`` and ``bootstrap_seed``; ``epsilon``
    blank for clean accuracy), ``PREFIX.md`` and ``PREFIX.tex`` (a section per dataset). Runs without per-example
    files (older metrics without ``predictions``) are skipped with a warning. Returns the unrounded frame.
    """
    frame = paired_frame(metrics_paths, summary_paths, resamples, seed)
    note = PAIRED_NOTE.format(b=resamples, seed=seed)
    markdown, latex = [], []
    for dataset, part in frame.groupby("dataset", sort=False):
        name = dataset_display(dataset)
        table = _paired_display(part, tex=False).to_markdown(index=False, disable_numparse=True)
        markdown.append(f"### {name}\n\n{table}\n\n{_power_line(part)}\n\n{_excluding_zero_line(part)}\n")
        caption = f"Paired differences in accuracy, {name} (B = {resamples:,} bootstrap resamples, seed {seed})."
        latex.append(
            _paired_display(part, tex=True).to_latex(
                index=False, escape=False, caption=caption, label=f"tab:paired:{dataset}"
            )
        )
    if frame.empty:
        log.warning("no paired comparison possible: no two methods with per-example files on the same dataset")
        markdown.append("No paired comparison possible: no two methods with per-example files on the same dataset.\n")
    three = ["method_accuracy", "reference_accuracy", "difference", "ci95_low", "ci95_high", "se", "mde80"]
    rounded = frame.round({c: 3 for c in three} | {"p_value": 5})
    out_prefix = Path(out_prefix)
    write_text(out_prefix.with_name(f"{out_prefix.name}.csv"), rounded.to_csv(index=False, lineterminator="\n"))
    write_text(out_prefix.with_name(f"{out_prefix.name}.md"), "\n".join(markdown) + "\n" + note + "\n")
    write_text(out_prefix.with_name(f"{out_prefix.name}.tex"), "\n".join(latex))
    return frame


# --- figures ---------------------------------------------------------------------------------------------------


def _save_figure(grid: Any, out_dir: Path, name: str) -> list[Path]:
    """Save a seaborn grid or matplotlib figure as PDF and PNG, each atomically."""
    from carlrar.storage import atomic_path

    paths = []
    for ext in ("pdf", "png"):
        path = out_dir / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            grid.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths


def _styles(methods: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """One colour and one marker per method (by canonical position), the same in every figure."""
    import seaborn as sns

    known = list(METHOD_IDS) + sorted(set(methods).difference(METHOD_IDS))
    colours = sns.color_palette("colorblind", len(known))
    markers = ["o", "s", "D", "^", "v", "P", "X", "*"]
    return (
        {method_display(m): colours[i] for i, m in enumerate(known)},
        {method_display(m): markers[i % len(markers)] for i, m in enumerate(known)},
    )


def _accuracy_curve(attacks: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, method, epsilon): mean accuracy over seeds and its 95 % t-interval; epsilon 0 is clean."""
    clean = attacks.groupby(["dataset", "method", "seed"], as_index=False)["clean_accuracy"].first()
    curve = pd.concat(
        [
            clean.rename(columns={"clean_accuracy": "accuracy"}).assign(epsilon=0.0),
            attacks.rename(columns={"attacked_accuracy": "accuracy"})[
                ["dataset", "method", "seed", "epsilon", "accuracy"]
            ],
        ]
    ).drop_duplicates(["dataset", "method", "seed", "epsilon"])
    stats = curve.groupby(["dataset", "method", "epsilon"], as_index=False)["accuracy"].agg(["mean", "std", "count"])
    bounds = [t_interval(m, s, n) for m, s, n in zip(stats["mean"], stats["std"], stats["count"])]
    return stats.assign(low=[lo for lo, _ in bounds], high=[hi for _, hi in bounds])


def _errorbar(ax: Any, x: Any, y: Any, low: Any, high: Any, name: str, colours: dict, markers: dict) -> None:
    """Line with markers and (where defined) asymmetric error bars from interval bounds."""
    y, low, high = (np.asarray(v, dtype=float) for v in (y, low, high))
    yerr = np.vstack([y - low, high - y]) if not np.isnan(low).all() else None
    ax.errorbar(
        x, y, yerr=yerr, label=name, color=colours[name], marker=markers[name], markersize=4, capsize=2.5, lw=1.2
    )


def _robustness_figure(attacks: pd.DataFrame, paired: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Top: accuracy vs epsilon (mean over seeds, 95 % t-interval); bottom: paired difference from FreeLB.

    The bottom row answers the question the top row only suggests (is a method more robust than FreeLB on these
    examples?) with the paired bootstrap interval of table_paired; it is left out when there is nothing to pair.
    Base appears there only when it is the sole method besides FreeLB.
    """
    import matplotlib.pyplot as plt

    datasets = _order(attacks["dataset"].tolist(), DATASET_IDS)
    methods = _order(attacks["method"].tolist(), METHOD_IDS)
    colours, markers = _styles(methods)
    curve = _accuracy_curve(attacks)
    versus = paired[paired["reference"] == REFERENCE_METHOD] if len(paired) else paired
    rows = 2 if len(versus) else 1
    fig, axes = plt.subplots(rows, len(datasets), figsize=(3.6 * len(datasets), 3.0 * rows), squeeze=False)
    dodge = 0.012 * max(float(attacks["epsilon"].max()), 1e-9)
    for col, dataset in enumerate(datasets):
        ax = axes[0, col]
        for i, method in enumerate(methods):
            part = curve[(curve["dataset"] == dataset) & (curve["method"] == method)].sort_values("epsilon")
            if len(part):
                x = part["epsilon"] + (i - (len(methods) - 1) / 2) * dodge
                _errorbar(ax, x, part["mean"], part["low"], part["high"], method_display(method), colours, markers)
        ax.set_title(dataset_display(dataset))
        if rows == 2:
            _difference_panel(axes[1, col], versus[versus["dataset"] == dataset], methods, dodge, colours, markers)
        axes[-1, col].set_xlabel("ε (l2 radius of k-PGD; 0 = clean)")
    axes[0, 0].set_ylabel("accuracy (%)\nmean over seeds, 95 % t-CI")
    if rows == 2:
        axes[1, 0].set_ylabel("difference from FreeLB (points)\npaired bootstrap 95 % CI")
    entries = {}  # every method once, from all panels (a method may be missing on some datasets)
    for ax in axes[0]:
        entries.update({label: handle for handle, label in zip(*ax.get_legend_handles_labels())})
    legend = {"loc": "lower center", "ncol": len(entries), "frameon": False, "bbox_to_anchor": (0.5, -0.06)}
    fig.legend(list(entries.values()), list(entries.keys()), **legend)
    fig.tight_layout()
    return _save_figure(fig, out_dir, "robustness_vs_epsilon")


def _difference_panel(
    ax: Any, part: pd.DataFrame, methods: list[str], dodge: float, colours: dict, markers: dict
) -> None:
    """Method minus FreeLB per epsilon (clean at 0) with its paired-bootstrap interval, and the zero line."""
    ax.axhline(0.0, color="0.3", lw=0.8, zorder=0)
    if part.empty:
        ax.text(0.5, 0.5, "no FreeLB runs to compare", ha="center", va="center", transform=ax.transAxes)
        return
    if set(part["method"]) - {"base"}:  # base's large gap (clear in the top row) would squash the others' scale
        part = part[part["method"] != "base"]
    for i, method in enumerate(methods):
        rows = part[part["method"] == method].assign(x=lambda f: f["epsilon"].fillna(0.0)).sort_values("x")
        if len(rows):
            x = rows["x"] + (i - (len(methods) - 1) / 2) * dodge
            name = method_display(method)
            _errorbar(ax, x, rows["difference"], rows["ci95_low"], rows["ci95_high"], name, colours, markers)


def _log_axis(axis: Any) -> None:
    """Log scale labelled at 1, 2 and 5 per decade in plain numbers (the default 2x10^-3 labels collide)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.axes.set_xscale("log") if axis.axis_name == "x" else axis.axes.set_yscale("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _distance_axis(axis: Any, values: pd.Series) -> None:
    """Log scale where the values span a factor of 4 or more (ratios then read best), else linear, zoomed to them."""
    from matplotlib.ticker import MaxNLocator

    if (values > 0).all() and values.max() >= 4 * values.min():
        _log_axis(axis)
    else:
        axis.set_major_locator(MaxNLocator(nbins=4))


def _distance_figure(attacks: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Representation distance per method: dot plots, methods on the y axis, 1 - cosine and Euclidean distance.

    Cosine similarities sit near 1, so a 0-1 axis shows identical bars; 1 - cosine, on a log axis where it spans a
    factor of 4 or more (several epsilons) and else zoomed to the data, shows the differences the table's third
    decimal hides. Each panel has its own axis (no zero baseline: dots, not bars); bars span the seeds' range.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    datasets = _order(attacks["dataset"].tolist(), DATASET_IDS)
    order = [method_display(m) for m in _order(attacks["method"].tolist(), METHOD_IDS)]
    frame = attacks.assign(
        method=attacks["method"].map(method_display),
        eps=attacks["epsilon"].map(lambda e: f"ε = {e:g}"),
        one_minus_cosine=1.0 - attacks["mean_cosine"],
    )
    hue_order = [f"ε = {e:g}" for e in sorted(attacks["epsilon"].unique())]
    measures = [("one_minus_cosine", "1 − cosine similarity"), ("mean_euclidean", "Euclidean distance")]
    dodge = 0.5 if len(hue_order) > 1 else False  # seaborn divides by (levels - 1) when dodging
    fig, axes = plt.subplots(len(datasets), 2, figsize=(9.0, 0.45 * len(order) * len(datasets) + 1.2), squeeze=False)
    for row, dataset in enumerate(datasets):
        part = frame[frame["dataset"] == dataset]
        for col, (value, title) in enumerate(measures):
            ax = axes[row, col]
            sns.pointplot(
                data=part, x=value, y="method", hue="eps", order=order, hue_order=hue_order, dodge=dodge,
                linestyle="none", errorbar=("pi", 100), markersize=4, capsize=0.15, err_kws={"linewidth": 1},
                palette="viridis", legend=row == 0 and col == 1, ax=ax,
            )  # fmt: skip
            _distance_axis(ax.xaxis, part[value])
            ax.set_title(f"{dataset_display(dataset)}: {title}")
            ax.set_ylabel("")
            ax.set_xlabel(title + (" (log scale)" if ax.get_xscale() == "log" else ""))
            ax.tick_params(labelleft=col == 0)
    legend = axes[0, 1].get_legend()
    if legend is not None:
        sns.move_legend(axes[0, 1], "upper left", bbox_to_anchor=(1.02, 1.0), title="attack radius", frameon=False)
    fig.text(0.01, -0.01, "Mean over seeds; bars span the lowest to the highest seed.", fontsize=7, ha="left")
    fig.tight_layout()
    return _save_figure(fig, out_dir, "representation_distance")


def _learning_curves_figure(metrics_paths: list[Path], out_dir: Path) -> list[Path]:
    """Dev accuracy per evaluation, one panel per dataset: mean over seeds with markers, band ± 1 sd."""
    import seaborn as sns

    history = []
    for path in map(Path, metrics_paths):
        m = read_json(path, "metrics file")
        history += [
            {"dataset": m["dataset"], "method": m["method"], "seed": m["seed"], "epoch": h["epoch"]}
            | {"dev accuracy (%)": 100.0 * h["dev_accuracy"]}
            for h in m.get("history", [])
        ]
    if not history:
        return []
    frame = pd.DataFrame(history)
    methods = _order(frame["method"].tolist(), METHOD_IDS)
    colours, markers = _styles(methods)
    datasets = _order(frame["dataset"].tolist(), DATASET_IDS)
    frame = frame.assign(
        method=frame["method"].map(method_display),
        dataset=frame["dataset"].map(dataset_display),
    )
    names = [method_display(m) for m in methods]
    grid = sns.relplot(
        data=frame, x="epoch", y="dev accuracy (%)", hue="method", style="method", hue_order=names,
        style_order=names, palette=colours, markers=markers, dashes=False, col="dataset",
        col_order=[dataset_display(d) for d in datasets], col_wrap=min(2, len(datasets)), kind="line",
        errorbar="sd", err_kws={"alpha": 0.15}, markersize=5, linewidth=1.3, height=3.0, aspect=1.4,
        facet_kws={"sharey": False, "sharex": False},
    )  # fmt: skip
    grid.set_titles("{col_name}")
    grid.legend.set_title("mean over seeds\n(band: ± 1 sd)")
    return _save_figure(grid, out_dir, "learning_curves")


def write_figures(
    metrics_paths: list[Path],
    summary_paths: list[Path],
    out_dir: Path,
    paired: pd.DataFrame | Path | str | None = None,
) -> list[Path]:
    """Accuracy under attack against epsilon, representation distance, and dev-accuracy learning curves.

    ``paired`` gives the robustness figure its bottom row (difference from FreeLB with the paired bootstrap
    interval): ``table_paired.csv``, or the frame of :func:`paired_frame`; None computes it from the
    per-example files beside the metrics and summaries (runs without them are skipped with a warning).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    out_dir = Path(out_dir)
    attacks = attack_frame(summary_paths)
    if paired is None:
        paired = paired_frame(metrics_paths, summary_paths)
    elif not isinstance(paired, pd.DataFrame):
        paired = pd.read_csv(paired)
    written: list[Path] = []
    for draw in (
        lambda: _robustness_figure(attacks, paired, out_dir),
        lambda: _distance_figure(attacks, out_dir),
        lambda: _learning_curves_figure(metrics_paths, out_dir),
    ):
        written += draw()
        plt.close("all")
    return written
