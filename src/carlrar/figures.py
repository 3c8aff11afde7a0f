"""The paper's figures: accuracy under attack against epsilon (with paired differences from FreeLB), the
representation distances between clean and attacked sentences, and dev-accuracy learning curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carlrar.paired import paired_frame
from carlrar.registry import DATASET_IDS, METHOD_IDS, dataset_display, method_display
from carlrar.reporting import REFERENCE_METHOD, attack_frame, in_table_order, t_interval
from carlrar.storage import read_json


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

    datasets = in_table_order(attacks["dataset"].tolist(), DATASET_IDS)
    methods = in_table_order(attacks["method"].tolist(), METHOD_IDS)
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

    datasets = in_table_order(attacks["dataset"].tolist(), DATASET_IDS)
    order = [method_display(m) for m in in_table_order(attacks["method"].tolist(), METHOD_IDS)]
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
    methods = in_table_order(frame["method"].tolist(), METHOD_IDS)
    colours, markers = _styles(methods)
    datasets = in_table_order(frame["dataset"].tolist(), DATASET_IDS)
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
