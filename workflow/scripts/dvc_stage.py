"""The commands of the DVC pipeline (dvc.yaml): run Snakemake for the run params.yaml names, summarise its tables.

DVC versions the data, trained weights, tables and metrics; Snakemake decides which jobs are out of date and
runs them in parallel. Each DVC stage therefore calls Snakemake for the whole run and lets it do only what is needed.

    python workflow/scripts/dvc_stage.py fingerprints   # every job's settings and code digests (the stages' params)
    python workflow/scripts/dvc_stage.py snakemake [SNAKEMAKE ARGS...]   # e.g. --until prepare
    python workflow/scripts/dvc_stage.py split-hashes   # the prepared splits' content hashes, all datasets
    python workflow/scripts/dvc_stage.py summary
    python workflow/scripts/dvc_stage.py status [DVC STATUS ARGS...]  # fingerprints, then `dvc status`

What reruns: DVC hashes files, so it cannot itself compute what a job depends on (a digest of the code blind to
comments, the settings of one method). The ``fingerprints`` stage writes them, from the same functions that give
the Snakemake rules their params (carlrar.plan), to ``results/<run>/fingerprints.yaml``; the other stages
declare its sections as params. The workflow stage depends on the prepared splits' content hashes, not on the
prepared files, so a re-prepare that samples the same rows reruns nothing after it. ``dvc repro`` runs the
fingerprints stage first; ``dvc status`` reads the file as last written, so ``dvc_stage.py status`` refreshes it.

params.yaml has two sections. ``run`` (config file, run name, raw data folder) says *what* is built: dvc.yaml
declares it as a parameter, so a change reruns the stages. ``machine`` (Snakemake profile, extra arguments) says
*how*: it is read here and not declared, so moving from a workstation to SLURM does not make DVC rerun anything.
``SNAKEMAKE_PROFILE=profiles/slurm dvc repro`` overrides ``machine.profile`` for one call.

Errors are one line on stderr and exit code 2, as with ``carlrar``.
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
from typing import TYPE_CHECKING, NoReturn

import yaml

if TYPE_CHECKING:
    from carlrar.config import Config

PARAMS = Path("params.yaml")
POINT_ELSEWHERE = "dvc exp run -S run.raw_dir=/path/to/raw (or edit run.raw_dir in params.yaml)"


def fail(message: str) -> NoReturn:
    """One line on stderr and exit code 2: the message names the problem and the way out, no traceback."""
    print(f"dvc_stage.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def load_params() -> tuple[dict, dict]:
    """params.yaml's run and machine sections, read as strictly as a config (no duplicate keys, no alias bomb)."""
    from carlrar.config import read_yaml  # light: pyyaml and jsonschema
    from carlrar.errors import CarlrarError

    try:
        params = read_yaml(PARAMS, "params file") or {}
    except CarlrarError as exc:
        fail(str(exc))
    run = params.get("run") or {}
    missing = [key for key in ("config", "name", "raw_dir") if not run.get(key)]
    if missing:
        fail(f"{PARAMS}: run.{missing[0]} is not set")
    return run, params.get("machine") or {}


def load_run_config(run: dict) -> Config:
    """The run's workflow config, validated as the workflow will: a broken file fails here, in one line."""
    from carlrar.config import load_config  # the package: not needed (nor imported) by the summary stage
    from carlrar.errors import CarlrarError

    try:
        return load_config(run["config"])
    except CarlrarError as exc:
        fail(f"{PARAMS}: run.config: {exc}")


def check_run_name(run: dict, config: Config) -> None:
    """dvc.yaml names its outputs after run.name; the workflow after the config's run_name: they must agree."""
    if config.run_name != run["name"]:
        fail(
            f"{PARAMS}: run.name is {run['name']!r} but {run['config']} has run_name {config.run_name!r}; "
            "set run.name to the config's run_name"
        )


def check_raw_data(run: dict, config: Config) -> None:
    """Every file the run's config samples from must be in run.raw_dir before Snakemake starts.

    DVC hashes run.raw_dir as the prepare stage's dependency: data the workflow would download from the hub
    instead is not versioned, and offline the failure would only show in a job log. A fresh clone holds just
    data/raw/README.md there, so this is where a first `dvc repro` says what to put where.
    """
    from carlrar.sources import missing_local_files  # the package's own rule for which files a dataset reads

    raw_dir = Path(run["raw_dir"])
    if not raw_dir.is_dir():
        fail(f"{PARAMS}: run.raw_dir {str(raw_dir)!r} is not a folder; point it at the raw data: {POINT_ELSEWHERE}")
    missing = missing_local_files(config, raw_dir)
    if missing:
        fail(
            f"{PARAMS}: run.raw_dir {str(raw_dir)!r} lacks {', '.join(missing)} (the datasets of {run['config']}); "
            f'put each dataset\'s official files in {raw_dir}/<dataset>/ (README "Data"), '
            f"or point run.raw_dir at the folder holding them: {POINT_ELSEWHERE}"
        )


def run_snakemake(extra: list[str]) -> int:
    run, machine = load_params()
    config = load_run_config(run)
    check_run_name(run, config)
    check_raw_data(run, config)
    command = ["snakemake"]
    if machine.get("profile") and not os.environ.get("SNAKEMAKE_PROFILE"):
        command += ["--profile", str(machine["profile"])]
    command += shlex.split(str(machine.get("args") or ""))
    command += extra
    # --replace-workflow-config: the run is exactly the named file, not that file merged into config/config.yaml.
    # --config last: it takes several values, so a target after it would be read as one.
    command += ["--configfile", str(run["config"]), "--replace-workflow-config"]
    command += ["--config", f"raw_dir={run['raw_dir']}"]
    print("+", shlex.join(command), flush=True)
    return subprocess.call(command)


def fingerprints_path(run: dict) -> Path:
    return Path("results") / run["name"] / "fingerprints.yaml"


def split_hashes_path(run: dict) -> Path:
    return Path("data/processed") / f"{run['name']}.splits_sha256.json"


def write_fingerprints() -> int:
    """Every job's params (carlrar.plan.all_params) for params.yaml's run; rewritten only when they change."""
    from carlrar.plan import all_params
    from carlrar.storage import write_text

    run, _ = load_params()
    config = load_run_config(run)
    check_run_name(run, config)
    text = "# Written by dvc_stage.py fingerprints: what each job depends on (carlrar.plan). Do not edit.\n"
    text += yaml.safe_dump(all_params(config.raw), sort_keys=True)
    out = fingerprints_path(run)
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        write_text(out, text)
    print(f"wrote {out}", file=sys.stderr)  # stderr: `status --json` prints only DVC's JSON
    return 0


def write_split_hashes() -> int:
    """Every prepared dataset's splits_sha256.json in one file: the workflow stage's data dependency."""
    from carlrar.prepared import SPLIT_HASHES_FILE
    from carlrar.storage import write_text

    run, _ = load_params()
    config = load_run_config(run)
    folder = Path("data/processed") / run["name"]
    hashes = {}
    for dataset in config.datasets:
        path = folder / dataset / SPLIT_HASHES_FILE
        if not path.is_file():
            fail(f"{path} not found: the prepare stage did not prepare {dataset}; run `dvc repro prepare`")
        hashes[dataset] = json.loads(path.read_text(encoding="utf-8"))
    write_text(split_hashes_path(run), json.dumps(hashes, indent=2, sort_keys=True) + "\n")
    print(f"wrote {split_hashes_path(run)}")
    return 0


def status(extra: list[str]) -> int:
    """``dvc status`` after refreshing the fingerprints, so that it names every stage a change reruns."""
    write_fingerprints()
    return subprocess.call(["dvc", "status", *extra])


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
    sub.add_parser("fingerprints", help="write results/<run>/fingerprints.yaml: every job's settings and code digests")
    sub.add_parser("split-hashes", help="write data/processed/<run>.splits_sha256.json from the prepared datasets")
    sub.add_parser("status", help="refresh the fingerprints, then run `dvc status` (further arguments go to it)")
    args, extra = parser.parse_known_args(argv)
    if args.command in ("snakemake", "status"):
        return run_snakemake(extra) if args.command == "snakemake" else status(extra)
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    commands = {"summary": write_summary, "fingerprints": write_fingerprints, "split-hashes": write_split_hashes}
    return commands[args.command]()


if __name__ == "__main__":
    sys.exit(main())
