"""What reruns when something changes: on a finished grid (all five methods, real jobs on a tiny model), each
kind of edit is made to a copy, and the jobs Snakemake then plans (or runs) must be exactly those the edit can
affect, and `dvc status` (after the fingerprints are refreshed) must name exactly the DVC stages that hold them.
The README's table "What reruns when you change something" is checked against SCENARIOS here.

The copy holds its own ``src/carlrar`` first on PYTHONPATH, so the workflow and its jobs run the copy's code and
edits to it never touch the repository. Slow (the grid trains for real, about three minutes on two cores).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers.paths import BIN
from helpers.snakemake import copy_workflow, snakemake

pytestmark = pytest.mark.slow

METHODS = ["base", "freelb", "carl", "rar", "carl_rar"]
GATHERING = {"table2", "table7", "paired_table", "robustness_tables", "figures", "all"}  # the jobs over all runs
CONFIG = {
    "run_name": "rerun",
    "raw_dir": "raw",
    "data": {"max_length": 16},
    "model": {
        "name": "random:minilm-l6",
        "overrides": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
    },
    "training": {"seeds": [1], "methods": METHODS, "learning_rate": 1e-3, "epochs": 2, "eval_every": 0},
    "analysis": {"steps": 1, "batch_size": 16},
    "datasets": {
        "sst2": {
            "per_class": {"train": 16, "dev": 4, "test": 0},
            "dev_source": "official",
            "evaluate": "dev",
            "batch_size": 8,
            "freelb": {"init_mag": 0.6, "adv_lr": 0.1, "adv_max_norm": 0.0, "adv_steps": 2},
            "carl": {"start_epoch": 1, "negatives": 4},
        }
    },
}
ARGS = ("--configfile", "config/rerun.yaml", "--replace-workflow-config")
WORDS = {0: "bad awful dull poor grim cold weak", 1: "good great fine lovely superb warm bright"}


def _jobs(method: str, *, attack: bool = True) -> set[str]:
    jobs = {f"train sst2/{method}/1"}
    if attack:
        jobs |= {f"attack sst2/{method}/1"} | ({f"samples sst2/{method}/1"} if "rar" in method else set())
    return jobs


def _grid_of(methods: list[str]) -> set[str]:
    return set().union(*(_jobs(m) for m in methods)) | GATHERING


CARL_RUNS = _grid_of(["carl", "carl_rar"])
ATTACKS = {f"attack sst2/{m}/1" for m in METHODS} | {"samples sst2/rar/1", "samples sst2/carl_rar/1"}
FINGERPRINTS_AND_WORKFLOW = {"fingerprints", "workflow"}  # the fingerprints stage reads the config and the code
# change -> (the jobs a Snakemake dry run plans, the stages `dvc status` names); each edit is a function below
SCENARIOS = {
    "a comment or docstring in any module": (set(), {"fingerprints"}),
    "training.carl.temperature (CARL's loss)": (CARL_RUNS, FINGERPRINTS_AND_WORKFLOW),
    "datasets.sst2.carl.negatives (CARL's schedule)": (CARL_RUNS, FINGERPRINTS_AND_WORKFLOW),
    "datasets.sst2.freelb.adv_lr (FreeLB's values)": (_grid_of(METHODS[1:]), FINGERPRINTS_AND_WORKFLOW),
    "training.learning_rate (a shared setting)": (_grid_of(METHODS), FINGERPRINTS_AND_WORKFLOW),
    "analysis.steps (the attacks)": (ATTACKS | GATHERING - {"table2", "table7"}, FINGERPRINTS_AND_WORKFLOW),
    "code in contrastive.py (CARL only)": (CARL_RUNS, FINGERPRINTS_AND_WORKFLOW),
    "code in training.py (every method)": (_grid_of(METHODS), FINGERPRINTS_AND_WORKFLOW),
}


def _sentence(label: int, index: int) -> str:
    words = WORDS[label].split()
    return f"the film was {words[index % 7]} and {words[(index + 3) % 7]} {index}"


def _write_raw(root: Path) -> None:
    raw = root / "raw" / "sst2"
    raw.mkdir(parents=True)
    for name, count in (("train.tsv", 60), ("dev.tsv", 20)):
        lines = ["sentence\tlabel", *(f"{_sentence(i % 2, i)}\t{i % 2}" for i in range(count))]
        (raw / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _env(root: Path) -> dict[str, str]:
    return {"PYTHONPATH": f"{root / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _run(root: Path, *command: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **_env(root), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    environ.pop("SNAKEMAKE_PROFILE", None)
    result = subprocess.run(list(command), cwd=root, env=environ, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result


def _stage_helper(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(root, str(BIN / "python"), "workflow/scripts/dvc_stage.py", *args)


def _track_with_dvc(root: Path) -> None:
    """Make the finished grid a git + DVC repository whose dvc.lock records it as it is (dvc commit)."""
    params = {
        "run": {"config": "config/rerun.yaml", "name": "rerun", "raw_dir": "raw"},
        "machine": {"args": "--cores 2"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.org"]):
        _run(root, *command)
    _run(root, "git", "config", "user.name", "t")
    _run(root, str(BIN / "dvc"), "init", "-q")
    for helper in ("fingerprints", "split-hashes", "summary"):
        _stage_helper(root, helper)
    (root / "results/rerun/rar_warmup").mkdir(exist_ok=True)  # as the workflow stage's mkdir leaves it
    _run(root, str(BIN / "dvc"), "commit", "-f", "-q")


def dvc_stages(root: Path) -> set[str]:
    """The stages `dvc status` names once the fingerprints are fresh (dvc_stage.py status)."""
    return set(json.loads(_stage_helper(root, "status", "--json").stdout or "{}"))


def _write_config(root: Path, config: dict) -> None:
    (root / "config" / "rerun.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def planned(root: Path, *extra: str) -> set[str]:
    """The jobs a dry run plans, as 'rule dataset/method/seed' (or 'rule' for jobs without wildcards)."""
    result = snakemake("-n", *ARGS, *extra, cwd=root, env=_env(root))
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = set()
    for block in re.split(r"\n(?:local)?(?:rule|checkpoint) ", result.stdout)[1:]:
        name = block.split(":", 1)[0]
        match = re.search(r"^\s+wildcards: (.*)$", block, flags=re.M)
        values = [part.split("=", 1)[1] for part in match.group(1).split(", ")] if match else []
        jobs.add(f"{name} {'/'.join(values)}".strip())
    return jobs


def ran(root: Path, *extra: str) -> list[str]:
    """Run the workflow for real; the rules of the jobs that ran."""
    result = snakemake("--cores", "2", *ARGS, *extra, cwd=root, env=_env(root), timeout=900)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(root.glob("results/rerun/logs/**/*.log")))
    assert result.returncode == 0, result.stderr[-3000:] + logs
    return re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", result.stderr + result.stdout)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    """A finished grid; and what adding carl_rar to a finished four-method grid planned."""
    root = tmp_path_factory.mktemp("grid")
    copy_workflow(root, extra=("src/carlrar", "dvc.yaml", ".dvcignore"))
    _write_raw(root)
    _write_config(root, {**CONFIG, "training": {**CONFIG["training"], "methods": METHODS[:-1]}})
    ran(root)
    _write_config(root, CONFIG)
    added = planned(root)
    ran(root)
    assert planned(root) == set()
    _track_with_dvc(root)
    assert dvc_stages(root) == set()
    return root, added


@pytest.fixture
def grid(finished: tuple[Path, set[str]], tmp_path: Path) -> Path:
    """A copy of the finished grid (Snakemake's records and the files' times kept) to edit."""
    return Path(shutil.copytree(finished[0], tmp_path / "grid", symlinks=True))


def _edit_config(root: Path, dotted: str, value: object) -> None:
    config = yaml.safe_load((root / "config/rerun.yaml").read_text())
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    _write_config(root, config)


def _append(root: Path, module: str, text: str) -> None:
    path = root / "src/carlrar" / module
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")


def _comment_everywhere(root: Path) -> None:
    for module in ("training.py", "data.py", "contrastive.py", "attacks.py", "reporting.py"):
        path = root / "src/carlrar" / module
        text = path.read_text(encoding="utf-8")
        # a new comment line and a changed docstring: neither is code
        text = text.replace('"""', '"""Edited. ', 1)
        path.write_text(text + "\n# a comment\n", encoding="utf-8")


def _setting(dotted: str, value: object):
    return lambda root: _edit_config(root, dotted, value)


EDITS = {
    "a comment or docstring in any module": _comment_everywhere,
    "training.carl.temperature (CARL's loss)": _setting("training.carl.temperature", 0.1),
    "datasets.sst2.carl.negatives (CARL's schedule)": lambda root: _edit_config(
        root, "datasets.sst2.carl.negatives", 6
    ),
    "datasets.sst2.freelb.adv_lr (FreeLB's values)": lambda root: _edit_config(
        root, "datasets.sst2.freelb.adv_lr", 0.05
    ),
    "training.learning_rate (a shared setting)": _setting("training.learning_rate", 2e-3),
    "analysis.steps (the attacks)": _setting("analysis.steps", 2),
    "code in contrastive.py (CARL only)": lambda root: _append(root, "contrastive.py", "\nEDITED = True\n"),
    "code in training.py (every method)": lambda root: _append(root, "training.py", "\nEDITED = True\n"),
}


def test_every_scenario_has_an_edit() -> None:
    assert set(EDITS) == set(SCENARIOS)


@pytest.mark.parametrize("change", list(SCENARIOS))
def test_a_change_plans_exactly_the_jobs_it_can_affect(grid: Path, change: str) -> None:
    EDITS[change](grid)
    jobs, stages = SCENARIOS[change]
    assert planned(grid) == jobs
    assert dvc_stages(grid) == stages


def test_a_new_method_in_the_grid_runs_only_its_own_jobs(finished: tuple[Path, set[str]]) -> None:
    assert finished[1] == _jobs("carl_rar") | GATHERING


def _dvc_repro_prepare(root: Path) -> None:
    _run(root, str(BIN / "dvc"), "repro", "-q", "prepare")


def test_an_edit_to_the_data_code_reruns_prepare_and_nothing_after_it_when_the_splits_are_the_same(grid: Path) -> None:
    _append(grid, "data.py", "\nEDITED = True\n")
    assert ran(grid) == ["prepare", "all"]
    assert dvc_stages(grid) == {"fingerprints", "prepare"}
    _dvc_repro_prepare(grid)
    assert dvc_stages(grid) == set()


def _raw_line(root: Path, *, sampled: bool) -> int:
    """The index of a raw train line (after the header) that is, or is not, in the prepared train split."""
    taken = set(pd.read_parquet(root / "data/processed/rerun/sst2/train.parquet")["text"])
    lines = (root / "raw/sst2/train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return next(i for i, line in enumerate(lines) if (line.split("\t")[0] in taken) == sampled)


def _edit_raw_line(root: Path, index: int) -> None:
    path = root / "raw/sst2/train.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()
    text, label = lines[index + 1].split("\t")
    lines[index + 1] = f"{text} (corrected)\t{label}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_a_raw_edit_outside_the_sample_reruns_prepare_only(grid: Path) -> None:
    _edit_raw_line(grid, _raw_line(grid, sampled=False))
    assert "prepare sst2" in planned(grid)
    assert dvc_stages(grid) == {"prepare"}
    assert ran(grid) == ["prepare", "all"]
    _dvc_repro_prepare(grid)
    assert dvc_stages(grid) == set()


def test_a_raw_edit_inside_the_sample_reruns_prepare_and_every_run_of_the_dataset(grid: Path) -> None:
    hashes = grid / "data/processed/rerun/sst2/splits_sha256.json"
    before = hashes.read_text()
    _edit_raw_line(grid, _raw_line(grid, sampled=True))
    assert dvc_stages(grid) == {"prepare"}
    _dvc_repro_prepare(grid)
    assert hashes.read_text() != before
    assert dvc_stages(grid) == {"workflow"}
    assert planned(grid) == _grid_of(METHODS)


def test_a_code_change_trains_from_step_0(grid: Path) -> None:
    """The rerun a code change causes discards the finished run's checkpoint: the fix reaches the weights."""
    run = "results/rerun/runs/sst2/base/seed1"
    _append(grid, "training.py", "\nEDITED = True\n")
    assert ran(grid, f"{run}/metrics.json") == ["train"]
    log = (grid / "results/rerun/logs/train/sst2/base/seed1.log").read_text()
    assert "training from step 0" in log and "resumed" not in log, log[-2000:]


def describe(jobs: set[str]) -> str:
    """A plan in words: the methods of each per-run rule, then the gathering jobs."""
    if not jobs:
        return "nothing"
    methods: dict[str, set[str]] = {}
    for job in jobs:
        rule, _, wildcards = job.partition(" ")
        methods.setdefault(rule, set()).add(wildcards.split("/")[1] if wildcards else "")
    words = [
        f"{rule}: {', '.join(m for m in METHODS if m in methods[rule])}"
        for rule in ("train", "attack", "samples")
        if rule in methods
    ]
    gathered = sorted(set(methods) & GATHERING - {"all"})
    if gathered:
        words.append("tables" if len(gathered) == len(GATHERING) - 1 else f"tables: {', '.join(gathered)}")
    return "; ".join(words)


def scenario_table() -> str:
    """The README's table of SCENARIOS."""
    rows = ["| change | Snakemake reruns | `dvc status` names |", "|---|---|---|"]
    for change, (jobs, stages) in SCENARIOS.items():
        rows.append(f"| {change} | {describe(jobs)} | {', '.join(sorted(stages))} |")
    return "\n".join(rows)
