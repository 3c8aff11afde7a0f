"""The commands of the DVC pipeline (dvc.yaml): run Snakemake for the run params.yaml names, summarise its tables.

DVC versions the data, checkpoints, tables and metrics; Snakemake decides which jobs are out of date and runs
them in parallel. Each DVC stage therefore calls Snakemake for the whole run and lets it do only what is needed.

    python workflow/scripts/dvc_stage.py snakemake [SNAKEMAKE ARGS...]   # e.g. --until prepare
    python workflow/scripts/dvc_stage.py summary

params.yaml has two sections. ``run`` (config file, run name, raw data folder) says *what* is built: dvc.yaml
declares it as a parameter, so a change reruns the stages. ``machine`` (Snakemake profile, extra arguments) says
*how*: it is read here and not declared, so moving from a workstation to SLURM does not make DVC rerun anything.
``SNAKEMAKE_PROFILE=profiles/slurm dvc repro`` overrides ``machine.profile`` for one call.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

PARAMS = Path("params.yaml")


def load_params() -> tuple[dict, dict]:
    params = yaml.safe_load(PARAMS.read_text(encoding="utf-8")) or {}
    run = params.get("run") or {}
    missing = [key for key in ("config", "name", "raw_dir") if not run.get(key)]
    if missing:
        sys.exit(f"{PARAMS}: run.{missing[0]} is not set")
    return run, params.get("machine") or {}


def check_run_name(run: dict) -> None:
    """dvc.yaml names its outputs after run.name; the workflow after the config's run_name: they must agree."""
    config = yaml.safe_load(Path(run["config"]).read_text(encoding="utf-8")) or {}
    if config.get("run_name") != run["name"]:
        sys.exit(
            f"{PARAMS}: run.name is {run['name']!r} but {run['config']} has run_name {config.get('run_name')!r}; "
            "set run.name to the config's run_name"
        )


def run_snakemake(extra: list[str]) -> int:
    run, machine = load_params()
    check_run_name(run)
    command = ["snakemake"]
    if machine.get("profile") and not os.environ.get("SNAKEMAKE_PROFILE"):
        command += ["--profile", str(machine["profile"])]
    command += ["--configfile", str(run["config"]), "--config", f"raw_dir={run['raw_dir']}"]
    command += shlex.split(str(machine.get("args") or ""))
    command += extra
    print("+", shlex.join(command), flush=True)
    return subprocess.call(command)


def _number(text: str) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


def summarise_table(path: Path) -> dict | None:
    """One table CSV as nested metrics: the columns that identify a row become keys, the numbers values.

    The keys are the columns holding text (dataset, method), then numeric columns from the left until every
    row is identified (epsilon). Tables whose keys would be free text (adversarial samples) are left out.
    """
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return None
    columns = list(rows[0])
    # numbers, or empty where a value does not apply (no FreeLB run to compare with)
    numeric = [
        c
        for c in columns
        if any(row[c] for row in rows) and all(not row[c] or _number(row[c]) is not None for row in rows)
    ]
    keys = [c for c in columns if c not in numeric]
    for column in [None, *numeric]:
        if column is not None:
            keys.append(column)
        if len({tuple(row[k] for k in keys) for row in rows}) == len(rows):
            break
    else:
        return None
    if any(len(row[k]) > 40 or "\n" in row[k] for row in rows for k in keys):
        return None
    summary: dict = {}
    for row in rows:
        node = summary
        for key in keys:
            node = node.setdefault(row[key] if key not in numeric else f"{key}={row[key]}", {})
        node.update({c: _number(row[c]) for c in numeric if c not in keys and row[c]})
    return summary if any(_has_values(v) for v in summary.values()) else None


def _has_values(node: dict) -> bool:
    return any(not isinstance(v, dict) or _has_values(v) for v in node.values())


def write_summary() -> int:
    run, _ = load_params()
    results = Path("results") / run["name"]
    summary = {}
    for table in sorted((results / "tables").glob("*.csv")):
        if (content := summarise_table(table)) is not None:
            summary[table.stem] = content
    out = results / "summary.json"
    out.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {out}: {', '.join(summary) or 'no tables'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("snakemake", help="run snakemake for params.yaml's run; further arguments go to snakemake")
    sub.add_parser("summary", help="write results/<run>/summary.json (DVC metrics) from the table CSVs")
    args, extra = parser.parse_known_args(argv)
    if args.command == "snakemake":
        return run_snakemake(extra)
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    return write_summary()


if __name__ == "__main__":
    sys.exit(main())
