"""The DVC pipeline (dvc.yaml, params.yaml, workflow/scripts/dvc_stage.py).

Fast tests check the files and the stage helper; the slow one runs `dvc repro` for the smoke config in a fresh
git + DVC repository (a copy of the workflow), then checks metrics, plots and that a second repro does nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from helpers.paths import BIN, ROOT
from helpers.snakemake import copy_workflow, snakemake

DVC_ENV = {"DVC_NO_ANALYTICS": "1"}
STAGE_HELPER = ROOT / "workflow" / "scripts" / "dvc_stage.py"
RAW_PLACEHOLDER = Path("data/raw/README.md")


def env() -> dict[str, str]:
    result = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **DVC_ENV}
    result.pop("SNAKEMAKE_PROFILE", None)
    return result


def run(*command: str, cwd: Path, timeout: int = 120, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``path``: a folder searched first for executables (a stand-in snakemake)."""
    environ = env()
    if path is not None:
        environ["PATH"] = f"{path}{os.pathsep}{environ['PATH']}"
    return subprocess.run(
        list(command), cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout, check=False
    )


def dvc(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    exe = BIN / "dvc"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "dvc"]
    return run(*command, *args, cwd=cwd, timeout=timeout)


def make_repo(dest: Path, params: dict) -> Path:
    """A git + DVC repository holding the workflow, dvc.yaml and the given params.yaml."""
    dest.mkdir()
    # what a fresh clone has of data/raw: the README only; the stages depend on the package's sources (the
    # workflow runs the installed package, with the same code)
    copy_workflow(dest, extra=("profiles", "dvc.yaml", ".dvcignore", ".gitignore", str(RAW_PLACEHOLDER), "src/carlrar"))
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


def cache_files(repo: Path) -> list[Path]:
    return [p for p in (repo / ".dvc/cache/files/md5").rglob("*") if p.is_file() and p.suffix != ".dir"]


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def project_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def smoke_params(raw_dir: Path) -> dict:
    params = project_params()
    params["run"].update({"config": "config/smoke.yaml", "name": "smoke", "raw_dir": str(raw_dir)})
    params["machine"].update({"profile": "profiles/quick", "args": ""})
    return params


# --- the files -----------------------------------------------------------------------------------------------------
def test_committed_params_agree_with_the_config_they_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """params.yaml's run.name is the run_name of the config file run.config names, as resolved (a default counts).

    dvc.yaml names its outputs after run.name and the workflow after run_name; the check is the stage helper's own,
    which `dvc repro` runs first, here in-process so that a mismatch is caught by the fast suite, not after a clone.
    """
    spec = importlib.util.spec_from_file_location("dvc_stage", STAGE_HELPER)
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    monkeypatch.chdir(ROOT)  # params.yaml and run.config are relative to the repository root
    run, machine = stage.load_params()
    config = stage.load_run_config(run)  # valid against the schema, else SystemExit(2) with the key
    stage.check_run_name(run, config)  # SystemExit(2) on a mismatch
    assert config.run_name == run["name"] == "paper"
    assert (ROOT / machine["profile"] / "config.yaml").is_file()


def test_dvc_yaml_tracks_folders_and_keeps_checkpoints() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert list(stages) == ["fingerprints", "prepare", "workflow", "summary"]
    assert stages["prepare"]["outs"][0] == {"data/processed/${run.name}": {"persist": True}}
    # the workflow reads the splits' content hashes and the jobs' params, never the package's files (comments)
    assert "src/carlrar" not in stages["workflow"]["deps"] and "src/carlrar" in stages["fingerprints"]["deps"]
    assert "data/processed/${run.name}.splits_sha256.json" in stages["workflow"]["deps"]
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


def stage_folder(folder: Path, config: str = "config/smoke.yaml", raw_dir: str = "data/raw") -> Path:
    """What the stage helper runs in: the configs, a params.yaml for ``config`` and a fresh clone's data/raw."""
    shutil.copytree(ROOT / "config", folder / "config")
    (folder / RAW_PLACEHOLDER).parent.mkdir(parents=True)
    shutil.copy2(ROOT / RAW_PLACEHOLDER, folder / RAW_PLACEHOLDER)
    params = project_params()
    name = yaml.safe_load((folder / config).read_text(encoding="utf-8"))["run_name"]
    params["run"].update({"config": config, "name": name, "raw_dir": raw_dir})
    params["machine"].update({"profile": "profiles/quick", "args": ""})
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


def fake_snakemake(folder: Path) -> Path:
    """A folder holding a `snakemake` that only prints its arguments: the helper's command line, no workflow."""
    folder.mkdir(exist_ok=True)
    exe = folder / "snakemake"
    exe.write_text('#!/bin/sh\necho "snakemake called: $*"\n')
    exe.chmod(0o755)
    return folder


def add_raw_files(raw_dir: Path, *names: str) -> None:
    for name in names:  # the helper checks that the files exist; their content is the prepare step's business
        (raw_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (raw_dir / name).write_text("")


def stage_helper(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, str(STAGE_HELPER), *args, cwd=folder, path=fake_snakemake(folder / "bin"))


def test_stage_helper_refuses_a_run_name_that_differs_from_the_config(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    params = project_params()
    params["run"].update({"config": "config/smoke.yaml", "name": "paper"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run(sys.executable, str(STAGE_HELPER), "snakemake", "-n", cwd=tmp_path)
    assert result.returncode == 2
    assert "run.name is 'paper' but config/smoke.yaml has run_name 'smoke'" in result.stderr


def test_stage_helper_refuses_params_naming_a_key_twice(tmp_path: Path) -> None:
    """YAML would keep the second run section (another config, another run name) without a word."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    text = yaml.safe_dump(project_params()) + "run: {config: config/smoke.yaml, name: smoke, raw_dir: data/raw}\n"
    (tmp_path / "params.yaml").write_text(text)
    result = run(sys.executable, str(STAGE_HELPER), "snakemake", "-n", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.search(r"params.yaml is not valid YAML: line \d+: duplicate key 'run'", result.stderr), result.stderr


def test_stage_helper_says_where_the_raw_data_goes_before_snakemake_runs(tmp_path: Path) -> None:
    """A fresh clone's data/raw holds only its README: one line naming the files, the folder and run.raw_dir."""
    result = stage_helper(stage_folder(tmp_path), "snakemake", "--until", "prepare")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith("dvc_stage.py: error: params.yaml: run.raw_dir 'data/raw' lacks ")
    assert "lacks sst2/train.tsv, sst2/dev.tsv (the datasets" in line  # no test file: smoke samples no test rows
    assert "(the datasets of config/smoke.yaml)" in line
    assert "data/raw/<dataset>/" in line and 'README "Data"' in line
    assert "dvc exp run -S run.raw_dir=/path/to/raw (or edit run.raw_dir in params.yaml)" in line
    assert "snakemake called" not in result.stdout


def test_stage_helper_names_alternative_files_and_only_the_splits_sampled(tmp_path: Path) -> None:
    """config/quick.yaml reads AG's News train from train.csv or train_partial.csv; SST-2 test is never read."""
    folder = stage_folder(tmp_path, config="config/quick.yaml")
    add_raw_files(folder / "data/raw", "sst2/train.tsv", "sst2/dev.tsv")
    result = stage_helper(folder, "snakemake")
    assert result.returncode == 2
    assert "lacks ag_news/train.csv or ag_news/train_partial.csv, ag_news/test.csv (the datasets" in result.stderr
    add_raw_files(folder / "data/raw", "ag_news/train_partial.csv", "ag_news/test.csv")
    assert stage_helper(folder, "snakemake").returncode == 0


def test_stage_helper_refuses_a_raw_dir_that_is_no_folder(tmp_path: Path) -> None:
    result = stage_helper(stage_folder(tmp_path, raw_dir="elsewhere/raw"), "snakemake")
    assert result.returncode == 2
    assert "run.raw_dir 'elsewhere/raw' is not a folder; point it at the raw data: dvc exp run -S" in result.stderr


def test_stage_helper_runs_exactly_the_named_config(tmp_path: Path) -> None:
    """--replace-workflow-config: the run is the named file alone, never merged into config/config.yaml."""
    folder = stage_folder(tmp_path)
    add_raw_files(folder / "data/raw", "sst2/train.tsv", "sst2/dev.tsv")
    result = stage_helper(folder, "snakemake", "-n", "all")
    assert result.returncode == 0, result.stderr
    # the target before --config, which takes several values and would swallow it
    assert (
        "snakemake called: --profile profiles/quick -n all --configfile config/smoke.yaml --replace-workflow-config"
        " --config raw_dir=data/raw"
    ) in result.stdout


def test_fresh_clone_repro_says_where_the_raw_data_goes(tmp_path: Path) -> None:
    """The README's steps in a fresh clone: DVC finds data/raw (its README), and the helper says what goes there."""
    repo = make_repo(tmp_path / "repo", project_params())
    result = dvc("repro", cwd=repo, timeout=300)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "No such file or directory" not in output
    assert "run.raw_dir 'data/raw' lacks sst2/train.tsv, sst2/dev.tsv, yahoo_answers/train.csv" in output
    assert "(the datasets of config/config.yaml)" in output


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


def test_git_keeps_the_raw_data_placeholder_only(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", project_params())
    assert run("git", "ls-files", "--error-unmatch", str(RAW_PLACEHOLDER), cwd=repo).returncode == 0
    assert run("git", "check-ignore", "-q", "data/raw/sst2/train.tsv", cwd=repo).returncode == 0
    assert project_params()["run"]["raw_dir"] == str(RAW_PLACEHOLDER.parent)


def test_dvcignore_leaves_checkpoints_out_and_results_in(tmp_path: Path) -> None:
    """checkpoint/ is resume state: not hashed, cached nor pushed. best/, metrics and predictions are results."""
    repo = make_repo(tmp_path / "repo", project_params())
    run_dir = "results/paper/runs/sst2/carl/seed1"
    ignored = [
        f"{run_dir}/checkpoint/state.safetensors",
        f"{run_dir}/checkpoint/state.json",
        f"{run_dir}/.checkpoint.abcd1234.tmp/state.json",  # a checkpoint swap (carlrar.storage)
        str(RAW_PLACEHOLDER),
    ]
    kept = [
        f"{run_dir}/best/weights.safetensors",
        f"{run_dir}/metrics.json",
        f"{run_dir}/eval_predictions.parquet",
        "results/paper/rar_warmup/sst2/reconstructor.safetensors",
        "data/raw/sst2/train.tsv",
        "data/processed/paper/sst2/train.parquet",
    ]
    for path in ignored + kept:
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text("x")
    result = dvc("check-ignore", *ignored, *kept, cwd=repo)
    assert sorted(result.stdout.split()) == sorted(ignored), result.stdout + result.stderr


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def dvc_readme_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("### Versioning with DVC", 1)[1].split("\n## ", 1)[0]


def test_every_remote_the_readme_shows_has_an_extra() -> None:
    """`dvc remote add ... s3://` fails without dvc-s3: each URL scheme shown is an extra, installed as shown."""
    extras = pyproject()["project"]["optional-dependencies"]
    section = dvc_readme_section()
    schemes = set(re.findall(r"\b([a-z0-9]+)://", section)) - {"http", "https"}
    assert {"s3", "ssh"} <= schemes, schemes
    for scheme in schemes:
        assert any(req.startswith(f"dvc[{scheme}]") for req in extras[scheme]), extras.get(scheme)
        assert "carlrar[workflow]" in extras[scheme]  # the extra alone gives DVC and Snakemake
        assert f".[{scheme}]" in section, scheme  # and the README says which to install
    assert 'pip install -e ".[s3]"' in section


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
    prepared = {"data/processed/smoke", "data/processed/smoke.splits_sha256.json"}  # the folder and its hashes
    assert {o["path"] for o in lock["prepare"]["outs"]} == prepared
    assert set(lock) == {"fingerprints", "prepare", "workflow", "summary"}
    assert {"results/smoke/runs", "results/smoke/tables", "results/smoke/figures"} <= {
        o["path"] for o in lock["workflow"]["outs"]
    }
    # prepared data, best weights and metrics are in the DVC cache (pushable); tables are small and go to git
    assert (repo / ".dvc" / "cache").is_dir()
    # Checkpoints (resume state) stay in the workspace only: not one of their files is in the cache, and the
    # runs folder's entry counts exactly the other files.
    checkpoint_files = sorted(results.glob("runs/*/*/seed*/checkpoint/*"))
    assert len(checkpoint_files) >= 4 * 2, checkpoint_files  # state.json + state.safetensors per run
    cached = {p.relative_to(repo / ".dvc/cache/files/md5").as_posix().replace("/", "") for p in cache_files(repo)}
    assert not {md5_of(p) for p in checkpoint_files} & cached
    run_files = [p for p in (results / "runs").rglob("*") if p.is_file() and "checkpoint" not in p.parts]
    assert {o["path"]: o["nfiles"] for o in lock["workflow"]["outs"]}["results/smoke/runs"] == len(run_files)
    assert {md5_of(p) for p in run_files} <= cached
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
    assert (clone / "results/smoke/runs/sst2/base/seed1/best/weights.safetensors").is_file()
    assert not list(clone.glob("results/smoke/runs/*/*/seed*/checkpoint"))  # never pushed: resume state
    assert (clone / "results/smoke/tables/table2_accuracy.csv").read_text() == (
        results / "tables/table2_accuracy.csv"
    ).read_text()
    # the README's way: the helper gives Snakemake the same profile, config and raw_dir as DVC's stages
    touch = run(sys.executable, "workflow/scripts/dvc_stage.py", "snakemake", "--touch", cwd=clone, timeout=300)
    assert touch.returncode == 0, touch.stderr[-3000:]
    args = ("--profile", "profiles/quick", "--configfile", "config/smoke.yaml", "--replace-workflow-config")
    plan = snakemake("-n", *args, "--config", f"raw_dir={raw_dir}", cwd=clone, timeout=300, env=DVC_ENV)
    assert plan.returncode == 0 and "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout[-3000:]
    assert "Data and pipelines are up to date" in dvc("status", cwd=clone).stdout
