"""Snakemake profiles (profiles/*) and the HTML report.

- profiles/default is Snakemake's *workflow profile*: it is loaded on every call made from the repository and
  its keys override those of any --profile, so it may hold only machine-neutral settings.
- Every machine profile plans the smoke grid in a dry run (profiles/slurm included: a dry run never calls
  SLURM).
- profiles/slurm is also run for real against stand-in SLURM commands (sbatch, sacct, ... on PATH) that record
  the submissions: this checks the sbatch options the plugin derives from the profile (GPUs, CPUs per GPU,
  memory, time, partition, account). What a real cluster would do with them is not covered.
- profiles/quick runs the smoke workflow end to end on the CPU on the real SST-2 files, and `snakemake --report`
  builds the HTML report from it (slow).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml
from helpers.paths import ROOT
from helpers.snakemake import copy_workflow, job_counts, job_resources, snakemake

PROFILES = ROOT / "profiles"
MACHINE_PROFILES = ("gpu", "quick", "slurm")
SMOKE_JOBS = {"prepare": 1, "train": 4, "table2": 1, "table7": 1, "all": 1}


def load_profile(name: str) -> dict:
    data = yaml.safe_load((PROFILES / name / "config.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict), name
    return data


# --- the profile files -----------------------------------------------------------------------------------------
def test_every_profile_folder_has_a_config() -> None:
    # an empty profile folder breaks every snakemake call (profiles/default is loaded implicitly)
    folders = sorted(p.name for p in PROFILES.iterdir() if p.is_dir())
    assert set(folders) >= {"default", *MACHINE_PROFILES}
    for name in folders:
        load_profile(name)


def test_default_profile_is_machine_neutral() -> None:
    """profiles/default wins over --profile key by key, so it must not set anything a machine profile sets."""
    default = load_profile("default")
    machine_keys = {
        "cores",
        "jobs",
        "resources",
        "executor",
        "latency-wait",
        "default-resources",
        "set-resources",
        "set-threads",
        "local-cores",
        "retries",
    }
    assert not set(default) & machine_keys
    for name in MACHINE_PROFILES:
        assert not set(default) & set(load_profile(name)), name


def rule_blocks() -> dict[str, str]:
    """Each rule's (or checkpoint's) text in workflow/rules/*.smk, by name."""
    blocks = {}
    for path in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for match in re.finditer(r"^(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*\n|\n)*)", path.read_text(), flags=re.M):
            blocks[match.group(1)] = match.group(2)
    return blocks


def gpu_rules() -> set[str]:
    return {name for name, body in rule_blocks().items() if re.search(r"^\s+gpu=1,", body, flags=re.M)}


def test_every_job_rule_declares_its_resources_benchmark_and_environment() -> None:
    blocks = rule_blocks()
    assert gpu_rules() == {"train", "rar_warmup", "attack", "samples", "hpsearch_train"}
    for name, body in blocks.items():
        if "localrule: True" in body or "shell:" not in body:
            continue  # tables and figures run in seconds beside Snakemake; `all`/`hpsearch` are targets
        for item in ("threads:", "gpu=", "mem_mb=", "runtime=", "benchmark:", "conda:"):
            assert item in body, f"rule {name} lacks {item}"
        if name in gpu_rules():
            assert "gpu_slots=1," in body and "CARLRAR_GPU_SLOTS={resources.gpu_slots}" in body, name


def test_gpu_profile_caps_concurrent_gpu_jobs_locally_and_sets_slots_per_rule() -> None:
    gpu = load_profile("gpu")
    assert gpu["cores"] >= 4 and any(re.fullmatch(r"gpu=\d+", str(r)) for r in gpu["resources"])
    assert {f"{rule}:gpu_slots=1" for rule in gpu_rules()} == set(gpu["set-resources"])


def test_quick_profile_needs_no_gpu() -> None:
    quick = load_profile("quick")
    assert "resources" not in quick and "executor" not in quick
    assert {f"{rule}:gpu=0" for rule in gpu_rules()} <= set(quick["set-resources"])
    assert {f"{rule}=1" for rule in gpu_rules()} <= set(quick["set-threads"])


def test_slurm_profile_has_no_local_gpu_cap_and_plugin_safe_resources() -> None:
    from snakemake_executor_plugin_slurm.validation import get_forbidden_slurm_options

    slurm = load_profile("slurm")
    assert slurm["executor"] == "slurm"
    assert "resources" not in slurm  # a global gpu cap would throttle the whole cluster run
    assert slurm["jobs"] >= 10
    defaults = slurm["default-resources"]
    assert defaults["slurm_partition"] == "<your-partition>" and defaults["slurm_account"] == "<your-account>"
    assert "cpus_per_task" not in defaults  # it would override cpus_per_gpu for the GPU jobs
    rules = slurm["set-resources"]
    assert "gpu" not in defaults and set(rules) == gpu_rules()  # every GPU rule goes to the GPU partition
    for rule in gpu_rules():
        assert rules[rule]["gpu"] == 1 and rules[rule]["cpus_per_gpu"] >= 1, rule
        assert rules[rule]["slurm_partition"] == "<your-gpu-partition>", rule
    for resources in [defaults, *rules.values()]:
        extra = str(resources.get("slurm_extra", ""))
        assert not any(re.search(pattern, extra) for pattern in get_forbidden_slurm_options())


# --- dry runs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", MACHINE_PROFILES)
def test_profile_dry_run_plans_the_smoke_jobs(profile: str, raw_dir: Path) -> None:
    result = snakemake(
        "-n",
        "--forceall",
        "--profile",
        f"profiles/{profile}",
        "--configfile",
        "config/smoke.yaml",
        "--replace-workflow-config",
        "--config",
        f"raw_dir={raw_dir}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"Using profiles profiles/{profile} and workflow specific profile profiles/default" in output
    counts = job_counts(output)
    assert {rule: counts.get(rule) for rule in SMOKE_JOBS} == SMOKE_JOBS, counts
    train = job_resources(output, "train")
    assert len(train) == 1, train
    train = train.pop()
    if profile == "quick":
        assert "gpu=0" in train
    else:
        assert "gpu=1" in train
    if profile == "slurm":
        for item in (
            "slurm_partition=<your-gpu-partition>",
            "slurm_account=<your-account>",
            "cpus_per_gpu=4",
            "mem_mb=32000",
            "runtime=720",
        ):
            assert item in train, train
        (prepare,) = job_resources(output, "prepare")
        assert "slurm_partition=<your-partition>" in prepare and "gpu=0" in prepare


# --- SLURM submissions, with stand-in SLURM commands --------------------------------------------------------------
FAKE_SBATCH = """\
#!{python}
import json, os, sys
stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "stdin": stdin}}) + "\\n")
print("4242")
"""


def test_slurm_profile_submits_gpu_and_cpu_jobs(tmp_path: Path, raw_dir: Path) -> None:
    """sbatch gets --gpus=1, --cpus-per-gpu, --mem, -t, -p, -A for training and a CPU request for prepare."""
    work = tmp_path / "work"
    work.mkdir()
    copy_workflow(work, extra=("profiles",))
    profile = work / "profiles/slurm/config.yaml"  # fill the placeholders as a user would
    text = profile.read_text()
    for placeholder, value in (
        ("<your-gpu-partition>", "gpupart"),
        ("<your-partition>", "cpupart"),
        ("<your-account>", "testacct"),
    ):
        text = text.replace(placeholder, value)
    profile.write_text(text)
    fake = tmp_path / "bin"
    fake.mkdir()
    scripts = {
        "sbatch": FAKE_SBATCH.format(python=sys.executable),
        "sacct": "#!/bin/sh\necho '4242|FAILED'\n",  # every job "fails" at once: nothing is run
        "scontrol": "#!/bin/sh\necho 'MaxArraySize = 1001'\n",
        "sacctmgr": "#!/bin/sh\necho testacct\n",
    }
    for name in ("squeue", "sinfo", "scancel", "sshare"):
        scripts[name] = "#!/bin/sh\nexit 0\n"
    for name, body in scripts.items():
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    log = tmp_path / "sbatch.jsonl"
    # Training: the prepared splits "exist" (empty files), so the only job is the training run.
    processed = work / "data/processed/smoke/sst2"
    processed.mkdir(parents=True)
    for name in ("train.parquet", "dev.parquet", "test.parquet", "manifest.json", "splits_sha256.json"):
        (processed / name).touch()
    common = (
        "--profile",
        "profiles/slurm",
        "--configfile",
        "config/smoke.yaml",
        "--replace-workflow-config",
        "--config",
        f"raw_dir={raw_dir}",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--seconds-between-status-checks",
        "1",
        "--retries",
        "0",
        "--latency-wait",
        "0",
    )
    fake_slurm = {"cwd": work, "path_prefix": f"{fake}{os.pathsep}", "env": {"FAKE_SLURM_LOG": str(log)}}
    snakemake(*common, "--", "results/smoke/runs/sst2/base/seed1/metrics.json", **fake_slurm)
    snakemake(*common, "--forcerun", "prepare", "--", "data/processed/smoke/sst2/manifest.json", **fake_slurm)

    assert log.is_file(), "sbatch was never called"
    calls = [json.loads(line)["argv"] for line in log.read_text().splitlines()]
    by_rule = {}
    for argv in calls:
        comment = argv[argv.index("--comment") + 1]
        by_rule.setdefault(comment.split("_wildcards")[0].removeprefix("rule_"), []).append(" ".join(argv))
    assert set(by_rule) == {"train", "prepare"} and all(len(v) == 1 for v in by_rule.values()), by_rule
    train, prepare = by_rule["train"][0], by_rule["prepare"][0]
    for option in ("--gpus=1", "--cpus-per-gpu=4", "--mem 32000", "-t 720", "-p gpupart", "-A testacct"):
        assert option in train, train
    assert "--cpus-per-task" not in train and "--gres" not in train
    for option in ("--cpus-per-task=1", "--mem 16000", "-t 60", "-p cpupart", "-A testacct"):
        assert option in prepare, prepare
    assert "--gpus" not in prepare and "--gres" not in prepare
    assert "--executor slurm-jobstep" in train  # the job runs its rule through the jobstep plugin


# --- a real run with the quick profile, then the report --------------------------------------------------------------
@pytest.mark.slow
def test_quick_profile_runs_the_smoke_workflow_and_the_report_builds(tmp_path: Path, real_raw_dir: Path) -> None:
    """On the real SST-2 files: the one end-to-end run of them (the other workflow tests use tests/fixtures/raw)."""
    pytest.importorskip("pygments")  # snakemake --report needs it
    copy_workflow(tmp_path, extra=("profiles",))
    args = (
        "--profile",
        "profiles/quick",
        "--configfile",
        "config/smoke.yaml",
        "--replace-workflow-config",
        "--config",
        f"raw_dir={real_raw_dir}",
    )
    result = snakemake(*args, cwd=tmp_path, timeout=900)
    logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("results/smoke/logs/**/*.log")))
    assert result.returncode == 0, result.stderr[-4000:] + logs
    assert "Using profiles profiles/quick and workflow specific profile profiles/default" in result.stderr
    tables = tmp_path / "results/smoke/tables"
    assert (tables / "table2_accuracy.csv").is_file() and (tables / "table7_params.md").is_file()

    report = snakemake("--report", "report.html", *args, cwd=tmp_path, timeout=300)
    assert report.returncode == 0, report.stderr[-4000:]
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert len(html) > 100_000  # the self-contained report app with the data embedded
    for name in ("table2_accuracy.md", "table2_accuracy.csv", "table7_params.md", "table7_params.csv"):
        assert name in html, name
    assert "Tables" in html and "Table 2" in html  # the category and the caption
    assert "carlrar" in html  # the workflow description (workflow/report/workflow.rst)
    output = report.stdout + report.stderr
    assert "Adding table2_accuracy.csv" in output and "Report created" in output
