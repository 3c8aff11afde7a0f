"""The Snakemake command line, run in a subprocess, and parsers for what a dry run (``-n``) prints.

Snakemake 9 has no Python API to call (``snakemake.snakemake()`` is gone), so every test runs the command line,
with the virtual environment's ``bin`` first on PATH so that the rules find ``carlrar``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from helpers.paths import BIN, ROOT

WORKFLOW_FILES = ("Snakefile", "workflow", "config")  # what a copy of the workflow needs at the least


def snakemake(
    *args: str, cwd: Path = ROOT, timeout: int = 120, env: dict[str, str] | None = None, path_prefix: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run ``snakemake *args`` in ``cwd``; never raises on a failure (check ``returncode``).

    ``env``: variables added to the environment. ``path_prefix``: put before PATH as it is (end it with
    ``os.pathsep``), e.g. a folder of stand-in commands. SNAKEMAKE_PROFILE is removed: a profile from the
    caller's environment would change the plans.
    """
    exe = BIN / "snakemake"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "snakemake"]
    environ = {**os.environ, **(env or {}), "PATH": f"{path_prefix}{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    environ.pop("SNAKEMAKE_PROFILE", None)
    return subprocess.run(
        [*command, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout, check=False
    )


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run: rule name -> number of jobs, and 'total'."""
    table = output[output.index("Job stats:") :]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, flags=re.M)}


def _job_blocks(output: str, rule: str) -> Iterator[str]:
    """The listing of every planned job of ``rule``: 'rule x:', 'localrule x:', 'checkpoint x:' or
    'localcheckpoint x:' and the indented lines under it."""
    for block in re.split(r"\n(?:local)?(?:rule|checkpoint) ", output)[1:]:
        if block.startswith(f"{rule}:"):
            yield block


def planned_wildcards(output: str, rule: str) -> set[tuple[str, ...]]:
    """The wildcard values of every planned job of ``rule`` in a dry run's job listing."""
    found = set()
    for block in _job_blocks(output, rule):
        match = re.search(r"^\s+wildcards: (.*)$", block, flags=re.M)
        found.add(tuple(part.split("=", 1)[1] for part in match.group(1).split(", ")))
    return found


def job_resources(output: str, rule: str) -> set[str]:
    """The `resources:` line of every planned job of ``rule`` in a dry run."""
    return {re.search(r"^\s+resources: (.*)$", block, flags=re.M).group(1) for block in _job_blocks(output, rule)}


def copy_workflow(dest: Path, extra: Iterable[str] = ()) -> Path:
    """Copy the workflow (``WORKFLOW_FILES``) and ``extra`` paths (e.g. "profiles", "dvc.yaml", "src/carlrar")
    from the repository into ``dest``, without Python caches; returns ``dest``.

    Without "profiles" the copy has no workflow profile (profiles/default), so Snakemake runs with its defaults.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in (*WORKFLOW_FILES, *extra):
        source, target = ROOT / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore)
        else:
            shutil.copy2(source, target)
    return dest
