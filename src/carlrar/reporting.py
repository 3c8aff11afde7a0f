"""Result tables from the runs' ``metrics.json`` files (paper Table 2 and, later, the others).

Table 2 is clean accuracy on each dataset's evaluated split (SST-2: GLUE dev; the others: test), as the mean and
standard deviation over training seeds, with each method's difference from FreeLB on the same dataset.

Rounding: means and standard deviations are rounded to 2 decimals (percent), and the difference from FreeLB is
taken between the *rounded* means, so every printed delta equals the difference of the printed numbers (as in the
paper). The standard deviation is the sample one (``ddof=1``, n - 1 in the denominator); with a single seed it is
undefined and left blank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from carlrar.errors import CarlrarError
from carlrar.storage import write_text

DATASET_ORDER = ("sst2", "yahoo_answers", "yelp_polarity", "ag_news")
DATASET_NAMES = {"sst2": "SST-2", "yahoo_answers": "Yahoo! Answers", "yelp_polarity": "Yelp-P", "ag_news": "AG's News"}
METHOD_ORDER = ("base", "freelb", "carl", "rar", "carl_rar")
METHOD_NAMES = {"base": "Base (fine-tuning)", "freelb": "FreeLB", "carl": "CARL", "rar": "RAR", "carl_rar": "CARL+RAR"}
REFERENCE_METHOD = "freelb"
TABLE2_COLUMNS = ["dataset", "method", "seeds", "mean", "std", "delta_vs_freelb"]
TABLE2_REQUIRED_KEYS = ("dataset", "method", "seed", "evaluated_split", "eval_accuracy")


class ReportError(CarlrarError):
    """The metrics files cannot be turned into a table."""


def _read_metrics(path: Path) -> dict[str, Any]:
    try:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"metrics file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is not valid JSON: {exc}") from None
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
        records.append({"dataset": key[0], "method": key[1], "seed": key[2],
                        "accuracy": 100.0 * float(m["eval_accuracy"])})

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
            rows.append({"dataset": dataset, "method": method, "seeds": n, "mean": mean, "std": std,
                         "delta_vs_freelb": delta})
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
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
            key, params = (str(m["dataset"]), str(m["method"])), int(m["params"])
        except FileNotFoundError:
            raise ReportError(f"metrics file not found: {path}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"{path}: cannot read 'dataset', 'method' and 'params' for Table 7 ({exc})") from None
        if counts.setdefault(key, params) != params:
            raise ReportError(f"{path}: {params:,} parameters, but another seed of {key[0]}/{key[1]} has {counts[key]:,}")
    if not counts:
        raise ReportError("no metrics files given for Table 7")
    rows = [
        {"dataset": d, "method": m, "params": counts[(d, m)],
         "extra_vs_base": counts[(d, m)] - counts[(d, "base")] if (d, "base") in counts else None}
        for d in _order([d for d, _ in counts], DATASET_ORDER)
        for m in _order([m for dd, m in counts if dd == d], METHOD_ORDER)
    ]
    frame = pd.DataFrame(rows).astype({"params": "int64", "extra_vs_base": "Int64"})
    wide = frame.pivot(index="method", columns="dataset", values="params")
    wide = wide.reindex(index=_order(frame["method"].tolist(), METHOD_ORDER),
                        columns=_order(frame["dataset"].tolist(), DATASET_ORDER))
    wide = wide.map(lambda v: "" if pd.isna(v) else f"{int(v):,}")
    wide.index = [METHOD_NAMES.get(m, m) for m in wide.index]
    wide.index.name = "Method"
    wide.columns = [DATASET_NAMES.get(d, d) for d in wide.columns]
    note = "Trainable parameters of the trained models (tied weights counted once)."
    out_prefix = Path(out_prefix)
    write_text(out_prefix.with_name(f"{out_prefix.name}.csv"), frame.to_csv(index=False, lineterminator="\n"))
    write_text(out_prefix.with_name(f"{out_prefix.name}.md"), wide.to_markdown() + "\n\n" + note + "\n")
    return frame
