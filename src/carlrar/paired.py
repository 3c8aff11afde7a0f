"""Paired comparisons of methods on the same examples (``table_paired``): each method minus FreeLB and minus base,
clean (each run's ``eval_predictions.parquet``) and under attack (``records_eps*.parquet``), by a paired bootstrap
over the evaluated split's examples within each seed (seeds averaged), with 95 % intervals, p-values and the
minimum detectable effect at 80 % power.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carlrar.registry import DATASET_IDS, METHOD_IDS, dataset_display, method_display
from carlrar.reporting import ReportError
from carlrar.storage import read_json, write_text

log = logging.getLogger(__name__)


PAIRED_REFERENCES = ("freelb", "base")  # every method is compared with each of these that ran on the dataset
BOOTSTRAP_RESAMPLES = 10_000
# The replicates of a group of comparisons are held at once, B x C float64 (one million x 40 is 320 MB); a
# percentile interval's Monte Carlo error is about 1 % of the bootstrap SE at B = 100,000 already.
MAX_RESAMPLES = 1_000_000
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


def check_resamples(resamples: int) -> None:
    """Refuse a bootstrap size outside [1, MAX_RESAMPLES] before any file is read or array allocated."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or not 1 <= resamples <= MAX_RESAMPLES:
        raise ReportError(
            f"bootstrap resamples {resamples!r} must be an integer from 1 to {MAX_RESAMPLES:,} (the replicates are "
            f"held in memory at once); the default is {BOOTSTRAP_RESAMPLES:,}"
        )


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
    check_resamples(resamples)
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
    check_resamples(resamples)
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
