"""The DVC pipeline (dvc.yaml, params.yaml, workflow/scripts/dvc_stage.py).

Fast tests check the files and the stage helper; the slow one runs `dvc repro` for the smoke config in a fresh
git + DVC repository (a copy of the workflow), then checks metrics, plots and that a second repro does nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGE_HELPER = ROOT / "workflow" / "scripts" / "dvc_stage.py"


def env() -> dict[str, str]:
    result = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    result.pop("SNAKEMAKE_PROFILE", None)
    return result


def run(*command: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def dvc(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    exe = BIN / "dvc"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "dvc"]
    return run(*command, *args, cwd=cwd, timeout=timeout)


def snakemake(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    exe = BIN / "snakemake"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "snakemake"]
    return run(*command, *args, cwd=cwd, timeout=timeout)


def make_repo(dest: Path, params: dict) -> Path:
    """A git + DVC repository holding the workflow, dvc.yaml and the given params.yaml."""
    dest.mkdir()
    for name in ("Snakefile", "workflow", "config", "profiles", "dvc.yaml", ".dvcignore", ".gitignore"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, dest / name)
    # the stages depend on the package's sources (the workflow runs the installed package, with the same code)
    shutil.copytree(
        ROOT / "src" / "carlrar", dest / "src" / "carlrar", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "test@example.org"],
        ["git", "config", "user.name", "test"],
        ["git", "config", "commit.gpgsign", "false"],
    ):
        assert run(*command, cwd=dest).returncode == 0
    init = dvc("init", "-q", cwd=dest)
    assert init.returncode == 0, init.stderr
    assert run("git", "add", "-A", cwd=dest).returncode == 0
    commit = run("git", "commit", "-q", "-m", "workflow", cwd=dest)
    assert commit.returncode == 0, commit.stderr
    return dest


def project_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def smoke_params(raw_dir: Path) -> dict:
    params = project_params()
    params["run"].update({"config": "config/smoke.yaml", "name": "smoke", "raw_dir": str(raw_dir)})
    params["machine"].update({"profile": "profiles/quick", "args": ""})
    return params


# --- the files -----------------------------------------------------------------------------------------------------
def test_params_name_the_paper_run() -> None:
    params = project_params()
    config = yaml.safe_load((ROOT / params["run"]["config"]).read_text(encoding="utf-8"))
    assert params["run"]["name"] == config["run_name"]
    assert (ROOT / params["machine"]["profile"] / "config.yaml").is_file()


def test_dvc_yaml_tracks_folders_and_keeps_checkpoints() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert list(stages) == ["prepare", "workflow", "summary"]
    assert stages["prepare"]["outs"] == ["data/processed/${run.name}"]
    outs = {
        next(iter(o)) if isinstance(o, dict) else o: (o[next(iter(o))] if isinstance(o, dict) else {})
        for o in stages["workflow"]["outs"]
    }
    for name in ("runs", "attacks", "samples"):  # else DVC deletes them before a rerun and everything retrains
        assert outs[f"results/${{run.name}}/{name}"].get("persist") is True
    assert "results/${run.name}/tables" in outs and "results/${run.name}/figures" in outs  # whole folders
    assert stages["summary"]["metrics"] == [{"results/${run.name}/summary.json": {"cache": False}}]


def test_dvc_resolves_the_stages_with_the_project_params(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", project_params())
    result = dvc("stage", "list", cwd=repo)
    assert result.returncode == 0, result.stderr
    for stage in ("prepare", "workflow", "summary"):
        assert stage in result.stdout
    assert "results/paper/summary.json" in result.stdout  # the run name is filled in from params.yaml


def test_stage_helper_refuses_a_run_name_that_differs_from_the_config(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    params = project_params()
    params["run"].update({"config": "config/smoke.yaml", "name": "paper"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run(sys.executable, str(STAGE_HELPER), "snakemake", "-n", cwd=tmp_path)
    assert result.returncode != 0
    assert "run.name is 'paper' but config/smoke.yaml has run_name 'smoke'" in result.stderr


def test_stage_helper_summarises_every_table(tmp_path: Path) -> None:
    tables = tmp_path / "results" / "smoke" / "tables"
    tables.mkdir(parents=True)
    (tables / "table2_accuracy.csv").write_text(
        "dataset,method,seeds,mean,std,delta_vs_freelb\nsst2,base,2,91.50,0.20,-0.30\nsst2,freelb,2,91.80,0.10,0.00\n"
        "ag_news,base,2,93.10,0.40,\n"
    )  # no FreeLB run on ag_news: no delta
    (tables / "table5_robustness.csv").write_text(
        "dataset,method,epsilon,attacked_accuracy_mean\nsst2,base,0.02,80.0\nsst2,base,0.1,40.0\n"
    )
    (tables / "table6_samples.csv").write_text(
        "dataset,method,original,adversarial\nsst2,rar,"
        + "a long sentence that is free text and no key " * 2
        + ",another sentence\n"
    )
    params = {"run": {"config": "config/smoke.yaml", "name": "smoke", "raw_dir": "data/raw"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run(sys.executable, str(STAGE_HELPER), "summary", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "results/smoke/summary.json").read_text())
    assert summary["table2_accuracy"]["sst2"]["base"] == {"seeds": 2, "mean": 91.5, "std": 0.2, "delta_vs_freelb": -0.3}
    assert summary["table2_accuracy"]["ag_news"]["base"] == {"seeds": 2, "mean": 93.1, "std": 0.4}
    assert summary["table5_robustness"]["sst2"]["base"]["epsilon=0.1"] == {"attacked_accuracy_mean": 40.0}
    assert "table6_samples" not in summary  # free text is no metric


# --- dvc repro on the smoke config ---------------------------------------------------------------------------
@pytest.mark.slow
def test_dvc_repro_builds_the_smoke_tables_then_is_up_to_date(tmp_path: Path, raw_dir: Path) -> None:
    repo = make_repo(tmp_path / "repo", smoke_params(raw_dir))

    first = dvc("repro", cwd=repo, timeout=900)
    logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(repo.glob("results/smoke/logs/**/*.log")))
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-3000:] + logs
    for stage in ("prepare", "workflow", "summary"):
        assert f"Running stage '{stage}'" in first.stdout
    assert "--profile profiles/quick --configfile config/smoke.yaml" in first.stdout  # the helper's command line

    results = repo / "results" / "smoke"
    for name in ("table2_accuracy.md", "table2_accuracy.csv", "table7_params.csv"):
        assert (results / "tables" / name).is_file(), name
    assert (repo / "data/processed/smoke/sst2/manifest.json").is_file()
    assert len(list(results.glob("runs/sst2/*/seed*/metrics.json"))) == 4

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {o["path"] for o in lock["prepare"]["outs"]} == {"data/processed/smoke"}
    assert {"results/smoke/runs", "results/smoke/tables", "results/smoke/figures"} <= {
        o["path"] for o in lock["workflow"]["outs"]
    }
    # checkpoints and prepared data are in the DVC cache (pushable); tables are small and go to git
    assert (repo / ".dvc" / "cache").is_dir()
    for path in ("data/processed/smoke", "results/smoke/runs", "results/smoke/figures"):
        assert run("git", "check-ignore", "-q", path, cwd=repo).returncode == 0, path
    assert run("git", "check-ignore", "-q", "results/smoke/tables/table2_accuracy.csv", cwd=repo).returncode == 1

    metrics = dvc("metrics", "show", "--json", cwd=repo)
    assert metrics.returncode == 0, metrics.stderr
    shown = json.loads(metrics.stdout)
    values = next(iter(shown.values()))["data"]["results/smoke/summary.json"]["data"]
    assert 0 <= values["table2_accuracy"]["sst2"]["base"]["mean"] <= 100
    assert values["table7_params"]["sst2"]["freelb"]["extra_vs_base"] == 0

    plots = dvc("plots", "show", "--json", cwd=repo)
    assert plots.returncode == 0, plots.stderr
    rendered = json.loads(plots.stdout)
    assert not rendered.get("errors"), rendered.get("errors")
    assert "results/smoke/tables/table2_accuracy.csv" in rendered["data"]

    again = dvc("repro", cwd=repo, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "Data and pipelines are up to date" in again.stdout, again.stdout
    assert "Running stage" not in again.stdout
    status = dvc("status", cwd=repo)
    assert status.returncode == 0 and "Data and pipelines are up to date" in status.stdout, status.stdout

    # The README's recipe for a fresh clone: commit, push to a remote, clone, pull, then `snakemake --touch`
    # (pulled files get new modification times, which Snakemake would otherwise take for changed inputs).
    assert dvc("remote", "add", "-d", "storage", str(tmp_path / "remote"), cwd=repo).returncode == 0
    assert run("git", "add", "-A", cwd=repo).returncode == 0
    assert run("git", "commit", "-q", "-m", "smoke run", cwd=repo).returncode == 0
    push = dvc("push", cwd=repo, timeout=300)
    assert push.returncode == 0, push.stderr
    assert run("git", "clone", "-q", str(repo), str(tmp_path / "clone"), cwd=tmp_path).returncode == 0
    clone = tmp_path / "clone"
    pull = dvc("pull", cwd=clone, timeout=300)
    assert pull.returncode == 0, pull.stderr
    assert (clone / "results/smoke/runs/sst2/base/seed1/metrics.json").is_file()
    assert (clone / "results/smoke/tables/table2_accuracy.csv").read_text() == (
        results / "tables/table2_accuracy.csv"
    ).read_text()
    args = (
        "--profile",
        "profiles/quick",
        "--configfile",
        "config/smoke.yaml",
        "--replace-workflow-config",
        "--config",
        f"raw_dir={raw_dir}",
    )
    touch = snakemake("--touch", *args, cwd=clone)
    assert touch.returncode == 0, touch.stderr[-3000:]
    plan = snakemake("-n", *args, cwd=clone)
    assert plan.returncode == 0 and "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout[-3000:]
    assert "Data and pipelines are up to date" in dvc("status", cwd=clone).stdout
