"""Write ``results/<run>/timing.md``: a run's measured wall time and where the CPU time went, per rule.

The per-job figures come from the Snakemake ``benchmark:`` files (``results/<run>/benchmarks/<rule>/...tsv``,
not in git); the whole run's wall time is measured outside Snakemake (e.g. ``time make quick``) and passed in,
so the committed summary states both without anyone typing a number into the README. The precision the runs
computed in and the CPU capability they saw come from their ``metrics.json``: the same config takes bf16 on a
CPU with native bf16 and fp32 on an AVX2 one, and the times differ accordingly.

    python workflow/scripts/timing_summary.py results/quick --wall-seconds 1534 --command "make quick ..."
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import pandas as pd


def per_rule(benchmarks: Path) -> pd.DataFrame:
    """Jobs, summed wall seconds and summed CPU seconds per rule (a rule's folder under ``benchmarks``)."""
    rows = []
    for path in sorted(benchmarks.rglob("*.tsv")):
        frame = pd.read_csv(path, sep="\t")
        rule = path.relative_to(benchmarks).parts[0]
        rows.append({"rule": rule, "wall_s": float(frame["s"].iloc[-1]), "cpu_s": float(frame["cpu_time"].iloc[-1])})
    if not rows:
        raise FileNotFoundError(f"no benchmark files under {benchmarks}")
    table = (
        pd.DataFrame(rows)
        .groupby("rule", sort=False)
        .agg(jobs=("wall_s", "size"), wall_s=("wall_s", "sum"), cpu_s=("cpu_s", "sum"))
    )
    return table.sort_values("cpu_s", ascending=False).round(0).astype({"wall_s": int, "cpu_s": int})


def describe_precision(record: dict | None) -> str:
    """A run's ``precision`` record of metrics.json in words (None: a run from before the record)."""
    if not record:
        return "not recorded (metrics.json from before the record)"
    native = "with" if record["cpu_native_bf16"] else "no"
    return (
        f"{record['used']} (training.precision {record['requested']}; "
        f"CPU capability {record['cpu_capability']}, {native} native bf16)"
    )


def precision_line(runs: Path) -> str:
    """One sentence: the precision of the training runs under ``runs`` and the CPU they saw, with run counts."""
    paths = sorted(runs.glob("*/*/*/metrics.json"))
    if not paths:
        return ""
    counts = Counter(describe_precision(json.loads(p.read_text(encoding="utf-8")).get("precision")) for p in paths)
    parts = [f"{what} in {count} of {len(paths)} runs" for what, count in counts.most_common()]
    return f"Precision of the training runs (their metrics.json): {'; '.join(parts)}."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="results/<run>")
    parser.add_argument("--wall-seconds", type=float, required=True, help="the whole run's measured wall time")
    parser.add_argument("--command", required=True, help="the command that was timed")
    parser.add_argument("--machine", default="2 CPU cores, no GPU", help="what it ran on")
    parser.add_argument("--note", default="", help="how the measurement was made, if not in one clean go")
    args = parser.parse_args(argv)
    try:
        table = per_rule(args.run_dir / "benchmarks")
    except FileNotFoundError as exc:
        print(f"timing_summary: {exc}", file=sys.stderr)
        return 2
    precision = precision_line(args.run_dir / "runs")
    minutes, seconds = divmod(round(args.wall_seconds), 60)
    total = table.sum()
    text = (
        f"**Timing of `{args.command}`.** "
        f"Wall time: **{minutes} min {seconds:02d} s** on {args.machine}. "
        f"Jobs: {int(total['jobs'])}; CPU time of all jobs: {int(total['cpu_s']):,} s "
        f"(at two jobs at a time, {int(total['cpu_s']) / 120:.1f} min of wall time if both cores were always busy).\n\n"
        + (f"{precision}\n\n" if precision else "")
        + (f"{args.note}\n\n" if args.note else "")
        + "Per rule, from Snakemake's benchmark files (wall and CPU seconds summed over the rule's jobs):\n\n"
        f"{table.reset_index().to_markdown(index=False)}\n"
    )
    (args.run_dir / "timing.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
