"""Write ``results/<run>/timing.md``: a run's measured wall time and where the CPU time went, per rule.

The per-job figures come from the Snakemake ``benchmark:`` files (``results/<run>/benchmarks/<rule>/...tsv``,
not in git); the whole run's wall time is measured outside Snakemake (e.g. ``time make quick``) and passed in,
so the committed summary states both without anyone typing a number into the README.

    python workflow/scripts/timing_summary.py results/quick --wall-seconds 1534 --command "make quick ..."
"""

from __future__ import annotations

import argparse
import sys
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
    minutes, seconds = divmod(round(args.wall_seconds), 60)
    total = table.sum()
    text = (
        f"**Timing of `{args.command}`.** "
        f"Wall time: **{minutes} min {seconds:02d} s** on {args.machine}. "
        f"Jobs: {int(total['jobs'])}; CPU time of all jobs: {int(total['cpu_s']):,} s "
        f"(at two jobs at a time, {int(total['cpu_s']) / 120:.1f} min of wall time if both cores were always busy).\n\n"
        + (f"{args.note}\n\n" if args.note else "")
        + "Per rule, from Snakemake's benchmark files (wall and CPU seconds summed over the rule's jobs):\n\n"
        f"{table.reset_index().to_markdown(index=False)}\n"
    )
    (args.run_dir / "timing.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
