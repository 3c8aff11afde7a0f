"""FreeLB's hyperparameter search (paper appendix A.2, Table 8): the grid, the trials and the choice per dataset.

The paper searches FreeLB's four hyperparameters per dataset inside fixed bounds (Table 8), "grid search at a
relatively large granularity, then manual tuning at a small granularity", with dev accuracy as the criterion,
and reuses the result for CARL and RAR. This module implements the grid part:

- :func:`grid_trials` turns the config's ``hpsearch.grid`` into trials, after checking every value against
  Table 8's bounds; each trial has a short readable id such as ``g0.6-a0.1-e0-n2`` (γ, α, ε, n) and the
  ``--set`` overrides that hand its values to ``carlrar train``.
- :func:`select` reads the trials' ``metrics.json`` files, averages dev accuracy over the search seeds and ranks
  the trials of each dataset: highest mean first; ties go to fewer ``adv_steps``, then smaller ``init_mag``,
  ``adv_lr`` and ``adv_max_norm`` (cheaper and gentler first), so the choice is deterministic.
- :func:`write_selection` writes ``<dataset>/best.yaml`` and ``freelb_best.yaml`` (``datasets: {<d>: {freelb:
  {...}}}``, ready to merge into a config) and ``trials.{md,csv}``, each atomically.

The manual fine-tuning that followed in the paper is left to the user (narrow the grid around the winner).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from carlrar.config import ConfigError
from carlrar.errors import CarlrarError
from carlrar.registry import DATASET_IDS, dataset_display
from carlrar.storage import read_json, write_text

if TYPE_CHECKING:  # the workflow imports the grid while parsing, where pandas may be absent; select() imports it
    import pandas as pd

PARAMS = ("init_mag", "adv_lr", "adv_max_norm", "adv_steps")
# Table 8: key -> (lower, upper, the paper's symbol). Both ends are inclusive.
BOUNDS: dict[str, tuple[float, float, str]] = {
    "init_mag": (0.0, 0.8, "γ"),
    "adv_lr": (0.01, 0.2, "α"),
    "adv_max_norm": (0.0, 0.5, "ε"),
    "adv_steps": (2, 4, "n"),
}
ID_LETTERS = {"init_mag": "g", "adv_lr": "a", "adv_max_norm": "e", "adv_steps": "n"}
TRIAL_COLUMNS = ["dataset", "method", "rank", "trial", *PARAMS, "seeds", "dev_accuracy", "dev_accuracy_std", "chosen"]


class HPSearchError(CarlrarError):
    """The trials' metrics files cannot be turned into a choice of hyperparameters."""


def _float_text(value: float) -> str:
    """``repr`` of a float, written so that YAML reads it back as a float (YAML 1.1 reads 1e-05 as a string)."""
    text = repr(float(value))
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def _number_text(value: float) -> str:
    """Shortest round-tripping text of a number, for ids and messages (``0.0`` -> ``0``, ``0.10`` -> ``0.1``)."""
    return str(int(value)) if float(value).is_integer() else _float_text(value)


def _bound_text(low: float, high: float) -> str:
    return f"[{_number_text(low)}, {_number_text(high)}]"


@dataclass(frozen=True)
class Trial:
    """One point of the grid: FreeLB's four searched hyperparameters."""

    init_mag: float
    adv_lr: float
    adv_max_norm: float
    adv_steps: int

    @property
    def id(self) -> str:
        """A short readable id, e.g. ``g0.6-a0.1-e0-n2`` (γ, α, ε, n); distinct values give distinct ids."""
        return "-".join(f"{ID_LETTERS[key]}{_number_text(getattr(self, key))}" for key in PARAMS)

    def values(self) -> dict[str, float | int]:
        return {
            "init_mag": float(self.init_mag),
            "adv_lr": float(self.adv_lr),
            "adv_max_norm": float(self.adv_max_norm),
            "adv_steps": int(self.adv_steps),
        }

    def tie_break(self) -> tuple[float, ...]:
        """Among equal dev accuracies: fewer adv_steps, then smaller init_mag, adv_lr, adv_max_norm."""
        return (self.adv_steps, self.init_mag, self.adv_lr, self.adv_max_norm)

    def overrides(self, dataset: str, epochs: float | None = None) -> list[str]:
        """``KEY=VALUE`` overrides (for ``carlrar train --set``) that give ``dataset`` this trial's values."""
        items = [
            f"datasets.{dataset}.freelb.{key}={value if key == 'adv_steps' else _float_text(value)}"
            for key, value in self.values().items()
        ]
        if epochs is not None:
            items.append(f"training.epochs={_number_text(epochs)}")  # an integer or a float, both valid
        return items


def check_grid(grid: Mapping[str, Any], where: str = "hpsearch.grid") -> None:
    """Raise ConfigError naming the key, the value and Table 8's bound when a grid value is out of bounds."""
    if not isinstance(grid, Mapping):
        raise ConfigError(f"config key '{where}': expected a mapping of {', '.join(PARAMS)} to lists of values")
    unknown = sorted(set(grid) - set(PARAMS))
    if unknown:
        raise ConfigError(f"config key '{where}': unknown key(s) {', '.join(unknown)}; known keys: {', '.join(PARAMS)}")
    for key in PARAMS:
        values = grid.get(key)
        if not isinstance(values, Sequence) or isinstance(values, str) or not values:
            raise ConfigError(f"config key '{where}.{key}': give a non-empty list of values")
        low, high, symbol = BOUNDS[key]
        for value in values:
            integer = key == "adv_steps"
            if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
                kind = "an integer" if integer else "a number"
                raise ConfigError(f"config key '{where}.{key}': {value!r} is not {kind}")
            if not low <= value <= high:
                raise ConfigError(
                    f"config key '{where}.{key}': {value!r} is outside the paper's bounds for {symbol} ({key}), "
                    f"{_bound_text(low, high)} (Table 8)"
                )


def grid_trials(hpsearch: Mapping[str, Any]) -> list[Trial]:
    """The trials of the config's ``hpsearch`` section (its full grid), bounds checked, in grid order."""
    grid = hpsearch.get("grid", {})
    check_grid(grid)
    trials = [Trial(*combo) for combo in itertools.product(*(grid[key] for key in PARAMS))]
    seen: dict[str, Trial] = {}
    for trial in trials:
        if trial.id in seen:
            raise ConfigError(f"config key 'hpsearch.grid': two grid points share the trial id {trial.id}")
        seen[trial.id] = trial
    return trials


# --- choosing the best trial per dataset -----------------------------------------------------------------------
def _read_trial_run(path: Path) -> dict[str, Any]:
    m = read_json(path, "metrics file")
    try:
        freelb = m["config"]["dataset"]["freelb"]
        trial = Trial(*(freelb[key] for key in PARAMS))
        record = {
            "dataset": str(m["dataset"]),
            "method": str(m["method"]),
            "seed": m["seed"],
            "trial": trial,
            "dev_accuracy": m["dev_accuracy"],
        }
    except (KeyError, TypeError) as exc:
        raise HPSearchError(
            f"{path}: needs 'dataset', 'method', 'seed', 'dev_accuracy' and config.dataset.freelb "
            f"({', '.join(PARAMS)}); missing {exc}"
        ) from None
    accuracy = record["dev_accuracy"]
    if isinstance(accuracy, bool) or not isinstance(accuracy, int | float) or not 0.0 <= accuracy <= 1.0:
        raise HPSearchError(f"{path}: 'dev_accuracy' must be a number in [0, 1], got {accuracy!r}")
    return record


def select(metrics_paths: Sequence[str | Path]) -> pd.DataFrame:
    """Every trial with its mean dev accuracy (%) over seeds and its rank within its dataset (1 = chosen)."""
    import pandas as pd

    if not metrics_paths:
        raise HPSearchError("no metrics files given")
    runs: dict[tuple[str, Trial], dict[int, float]] = {}
    origin: dict[tuple[str, Trial, int], Path] = {}
    methods: dict[str, tuple[str, Path]] = {}
    for path in map(Path, metrics_paths):
        r = _read_trial_run(path)
        key = (r["dataset"], r["trial"], r["seed"])
        if key in origin:
            raise HPSearchError(
                f"two metrics files for dataset {key[0]}, trial {key[1].id}, seed {key[2]}: {origin[key]} and {path}"
            )
        origin[key] = path
        first = methods.setdefault(r["dataset"], (r["method"], path))
        if first[0] != r["method"]:
            raise HPSearchError(
                f"dataset {r['dataset']}: {first[1]} is a {first[0]} run but {path} a {r['method']} run; "
                "compare trials of one method"
            )
        runs.setdefault((r["dataset"], r["trial"]), {})[r["seed"]] = 100.0 * float(r["dev_accuracy"])

    present = {dataset for dataset, _ in runs}
    datasets = [d for d in DATASET_IDS if d in present] + sorted(present.difference(DATASET_IDS))
    rows = []
    for dataset in datasets:
        scored = []
        for (d, trial), by_seed in runs.items():
            if d != dataset:
                continue
            accuracies = [by_seed[s] for s in sorted(by_seed)]  # a fixed order: the same float sum every time
            mean = math.fsum(accuracies) / len(accuracies)
            std = statistics.stdev(accuracies) if len(accuracies) > 1 else math.nan
            scored.append((trial, len(accuracies), mean, std))
        # round(): equal accuracies must tie exactly, whatever the float noise of the mean
        scored.sort(key=lambda item: (-round(item[2], 9), *item[0].tie_break()))
        for rank, (trial, n, mean, std) in enumerate(scored, start=1):
            rows.append(
                {
                    "dataset": dataset,
                    "method": methods[dataset][0],
                    "rank": rank,
                    "trial": trial.id,
                    **trial.values(),
                    "seeds": n,
                    "dev_accuracy": mean,
                    "dev_accuracy_std": std,
                    "chosen": rank == 1,
                }
            )
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


def best_per_dataset(frame: pd.DataFrame) -> dict[str, dict[str, float | int]]:
    """``{dataset: {init_mag, adv_lr, adv_max_norm, adv_steps}}`` of the rank-1 trials, in table order."""
    chosen = frame[frame["rank"] == 1]
    return {row.dataset: Trial(*(getattr(row, key) for key in PARAMS)).values() for row in chosen.itertuples()}


def _seed_note(frame: pd.DataFrame, dataset: str) -> str:
    counts = sorted(set(frame.loc[frame["dataset"] == dataset, "seeds"]))
    return " or ".join(map(str, counts))


def _comment(frame: pd.DataFrame, dataset: str) -> str:
    on = frame[frame["dataset"] == dataset]
    row = on[on["rank"] == 1].iloc[0]
    return (
        f"# {dataset}: trial {row['trial']}, dev accuracy {row['dev_accuracy']:.2f} % (mean over "
        f"{_seed_note(frame, dataset)} seed(s), {row['method']} runs), best of {len(on)} trials"
    )


def _yaml_text(frame: pd.DataFrame, datasets: list[str]) -> str:
    best = best_per_dataset(frame)
    header = [
        "# FreeLB hyperparameters chosen by `carlrar hpsearch-select`: grid search on dev accuracy (paper A.2,",
        "# Table 8), shared by FreeLB, CARL and RAR. Merge into a config, e.g.",
        "# (Snakemake merges config files in order)",
        "#   snakemake --configfile config/config.yaml results/<run>/hpsearch/freelb_best.yaml",
        *(_comment(frame, d) for d in datasets),
    ]
    body = {"datasets": {d: {"freelb": best[d]} for d in datasets}}
    return "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False)


def write_selection(metrics_paths: Sequence[str | Path], out_dir: str | Path) -> pd.DataFrame:
    """Write ``OUT_DIR/<dataset>/best.yaml``, ``OUT_DIR/freelb_best.yaml`` and ``OUT_DIR/trials.{md,csv}``."""
    frame = select(metrics_paths)
    out_dir = Path(out_dir)
    datasets = list(dict.fromkeys(frame["dataset"]))
    for dataset in datasets:
        write_text(out_dir / dataset / "best.yaml", _yaml_text(frame, [dataset]))
    write_text(out_dir / "freelb_best.yaml", _yaml_text(frame, datasets))

    csv = frame.to_csv(index=False, float_format="%.4f", lineterminator="\n")
    shown = frame.assign(
        dataset=[dataset_display(d) for d in frame["dataset"]],
        dev_accuracy=[f"{v:.2f}" for v in frame["dev_accuracy"]],
        dev_accuracy_std=["" if math.isnan(v) else f"{v:.2f}" for v in frame["dev_accuracy_std"]],
        chosen=["yes" if c else "" for c in frame["chosen"]],
    ).drop(columns=["method"])
    methods = ", ".join(sorted(set(frame["method"])))
    note = (
        f"Every trial of the grid search ({methods} runs): dev accuracy (%) as the mean and sample standard "
        "deviation over the search seeds; rank 1 is chosen (ties: fewer adv_steps, then smaller init_mag, adv_lr, "
        "adv_max_norm). init_mag = γ, adv_lr = α, adv_max_norm = ε (0: unbounded), adv_steps = n (paper Table 8)."
    )
    align = ["left" if c in ("dataset", "trial", "chosen") else "right" for c in shown.columns]
    markdown = shown.to_markdown(index=False, disable_numparse=True, colalign=align) + "\n\n" + note + "\n"
    write_text(out_dir / "trials.csv", csv)
    write_text(out_dir / "trials.md", markdown)
    return frame
