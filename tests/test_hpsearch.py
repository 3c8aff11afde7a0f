"""FreeLB's hyperparameter search: the grid and Table 8's bounds, the choice per dataset, and the planned workflow.

Fast: the selection runs on synthetic metrics files and the workflow is only planned (``snakemake -n``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers.configs import smoke_config
from helpers.paths import ROOT
from helpers.snakemake import job_counts, snakemake

from carlrar.cli import main
from carlrar.config import ConfigError, FreeLBConfig, from_mapping, load_config
from carlrar.hpsearch import HPSearchError, Trial, check_grid, grid_trials, select, write_selection


# --- the grid -----------------------------------------------------------------------------------------------------
def test_trial_ids_and_overrides() -> None:
    trial = Trial(init_mag=0.6, adv_lr=0.1, adv_max_norm=0.0, adv_steps=2)
    assert trial.id == "g0.6-a0.1-e0-n2"
    assert trial.overrides("sst2") == [
        "datasets.sst2.freelb.init_mag=0.6",
        "datasets.sst2.freelb.adv_lr=0.1",
        "datasets.sst2.freelb.adv_max_norm=0.0",
        "datasets.sst2.freelb.adv_steps=2",
    ]
    assert trial.overrides("ag_news", epochs=1.5)[-1] == "training.epochs=1.5"
    # the overrides reach the config through carlrar train's --set, so they must load as these exact values
    config = load_config(ROOT / "config" / "smoke.yaml", trial.overrides("sst2", epochs=1))
    assert config.dataset("sst2").freelb == FreeLBConfig(init_mag=0.6, adv_lr=0.1, adv_max_norm=0.0, adv_steps=2)
    assert config.training["epochs"] == 1


def test_default_grid_is_coarse_and_inside_the_bounds() -> None:
    hpsearch = load_config(ROOT / "config" / "config.yaml").raw["hpsearch"]
    assert (hpsearch["method"], hpsearch["seeds"], hpsearch["epochs"]) == ("freelb", [1], None)
    trials = grid_trials(hpsearch)
    assert len(trials) == 3 * 3 * 2 * 3 and len({t.id for t in trials}) == len(trials)
    assert trials[0].id == "g0-a0.01-e0-n2" and trials[-1].id == "g0.8-a0.2-e0.5-n4"


@pytest.mark.parametrize(
    ("key", "value", "bound"),
    [
        ("init_mag", 0.9, "[0, 0.8]"),
        ("adv_lr", 0.005, "[0.01, 0.2]"),
        ("adv_lr", 0.25, "[0.01, 0.2]"),
        ("adv_max_norm", 0.6, "[0, 0.5]"),
        ("adv_steps", 5, "[2, 4]"),
        ("adv_steps", 1, "[2, 4]"),
    ],
)
def test_out_of_bounds_value_is_named_with_its_bound(key: str, value: float, bound: str) -> None:
    grid = {"init_mag": [0.0], "adv_lr": [0.1], "adv_max_norm": [0.0], "adv_steps": [2]}
    grid[key] = [*grid[key], value]
    with pytest.raises(ConfigError) as error:
        check_grid(grid)
    message = str(error.value)
    assert f"'hpsearch.grid.{key}'" in message and repr(value) in message and bound in message, message
    assert "Table 8" in message


def test_grid_must_hold_lists_of_numbers() -> None:
    with pytest.raises(ConfigError, match=r"'hpsearch\.grid\.adv_steps': 2\.5 is not an integer"):
        check_grid({"init_mag": [0.0], "adv_lr": [0.1], "adv_max_norm": [0.0], "adv_steps": [2.5]})
    with pytest.raises(ConfigError, match=r"'hpsearch\.grid\.adv_lr': give a non-empty list"):
        check_grid({"init_mag": [0.0], "adv_lr": [], "adv_max_norm": [0.0], "adv_steps": [2]})


# --- the choice ---------------------------------------------------------------------------------------------------
def _run(tmp: Path, dataset: str, trial: Trial, seed: int, accuracy: float, method: str = "freelb") -> Path:
    path = tmp / "hpsearch" / dataset / trial.id / f"seed{seed}" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    freelb = {**trial.values(), "norm_type": "l2"}
    path.write_text(
        json.dumps(
            {
                "dataset": dataset,
                "method": method,
                "seed": seed,
                "dev_accuracy": accuracy,
                "test_accuracy": None,
                "config": {"dataset": {"freelb": freelb}},
            }
        )
    )
    return path


A = Trial(0.0, 0.1, 0.0, 3)  # best mean on sst2, alone
B = Trial(0.4, 0.1, 0.0, 2)
C = Trial(0.8, 0.01, 0.0, 2)  # ties B on sst2: B wins (same steps, smaller init_mag)
D = Trial(0.0, 0.2, 0.5, 4)  # ties E on ag_news: E wins (fewer steps)
E = Trial(0.8, 0.2, 0.5, 3)


@pytest.fixture
def trial_metrics(tmp_path: Path) -> list[Path]:
    runs = [
        ("sst2", A, 1, 0.90),
        ("sst2", A, 2, 0.86),  # mean 88
        ("sst2", B, 1, 0.85),
        ("sst2", B, 2, 0.87),  # mean 86
        ("sst2", C, 2, 0.84),
        ("sst2", C, 1, 0.88),  # mean 86 (seeds in the other order)
        ("ag_news", D, 1, 0.70),
        ("ag_news", E, 1, 0.70),
    ]
    return [_run(tmp_path, *run) for run in runs]


def test_select_means_over_seeds_and_breaks_ties(trial_metrics: list[Path]) -> None:
    frame = select(trial_metrics[::-1])  # the order of the files does not matter
    assert frame["dataset"].tolist() == ["sst2"] * 3 + ["ag_news"] * 2  # the paper's dataset order
    assert frame["trial"].tolist() == [A.id, B.id, C.id, E.id, D.id]
    assert frame["rank"].tolist() == [1, 2, 3, 1, 2]
    assert frame["chosen"].tolist() == [True, False, False, True, False]
    assert frame["dev_accuracy"].round(6).tolist() == [88.0, 86.0, 86.0, 70.0, 70.0]
    assert frame["seeds"].tolist() == [2, 2, 2, 1, 1]
    assert frame["dev_accuracy_std"].iloc[:3].round(4).tolist() == [2.8284, 1.4142, 2.8284]
    assert frame["dev_accuracy_std"].iloc[3:].isna().all()


def test_selection_files_merge_into_a_valid_config(trial_metrics: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_selection(trial_metrics, out)
    combined = yaml.safe_load((out / "freelb_best.yaml").read_text())
    assert combined == {"datasets": {"sst2": {"freelb": A.values()}, "ag_news": {"freelb": E.values()}}}
    assert yaml.safe_load((out / "sst2" / "best.yaml").read_text()) == {"datasets": {"sst2": {"freelb": A.values()}}}
    assert yaml.safe_load((out / "ag_news" / "best.yaml").read_text()) == {
        "datasets": {"ag_news": {"freelb": E.values()}}
    }
    assert "# sst2: trial g0-a0.1-e0-n3, dev accuracy 88.00 %" in (out / "freelb_best.yaml").read_text()

    # merged over the smoke config as Snakemake merges --configfile files: the result validates and applies
    merged = smoke_config()
    for name, section in yaml.safe_load((out / "sst2" / "best.yaml").read_text())["datasets"].items():
        merged["datasets"][name]["freelb"].update(section["freelb"])
    config = from_mapping(merged)
    assert config.dataset("sst2").freelb == FreeLBConfig(init_mag=0.0, adv_lr=0.1, adv_max_norm=0.0, adv_steps=3)

    table = pd.read_csv(out / "trials.csv")
    assert table.columns.tolist()[:4] == ["dataset", "method", "rank", "trial"]
    assert table.loc[table["chosen"], "trial"].tolist() == [A.id, E.id]
    markdown = (out / "trials.md").read_text()
    assert "SST-2" in markdown and "AG's News" in markdown and "88.00" in markdown and "Table 8" in markdown


def test_cli_hpsearch_select(trial_metrics: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["-q", "hpsearch-select", "--metrics", *map(str, trial_metrics), "--out-dir", str(out)]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "ag_news/best.yaml",
        "freelb_best.yaml",
        "sst2/best.yaml",
        "trials.csv",
        "trials.md",
    ]

    duplicate = _run(tmp_path / "again", "sst2", A, 1, 0.5)
    assert main(["hpsearch-select", "--metrics", *map(str, trial_metrics), str(duplicate), "--out-dir", str(out)]) == 2
    assert "two metrics files for dataset sst2, trial g0-a0.1-e0-n3, seed 1" in capsys.readouterr().err


def test_select_refuses_mixed_methods_and_incomplete_files(tmp_path: Path) -> None:
    freelb, carl = _run(tmp_path, "sst2", A, 1, 0.8), _run(tmp_path / "c", "sst2", B, 1, 0.8, method="carl")
    with pytest.raises(HPSearchError, match="compare trials of one method"):
        select([freelb, carl])
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"dataset": "sst2", "method": "freelb", "seed": 1, "dev_accuracy": 0.5}))
    with pytest.raises(HPSearchError, match="config.dataset.freelb"):
        select([broken])


# --- the workflow ---------------------------------------------------------------------------------------------------
def _search_config(tmp_path: Path, grid: dict) -> Path:
    config = smoke_config()
    config["run_name"] = "hpsearch_test"
    config["datasets"]["ag_news"] = {"per_class": {"train": 8, "dev": 4, "test": 4}, "batch_size": 4}
    config["hpsearch"] = {"seeds": [1, 3], "epochs": 1, "grid": grid}  # seed 3 is not among training.seeds
    path = tmp_path / "hpsearch.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_dry_run_plans_one_training_job_per_dataset_trial_and_seed(tmp_path: Path, raw_dir: Path) -> None:
    grid = {"init_mag": [0.0, 0.4], "adv_lr": [0.05], "adv_max_norm": [0.0], "adv_steps": [2, 3]}
    path = _search_config(tmp_path, grid)
    result = snakemake(
        "-n",
        "-p",
        "--forceall",
        "hpsearch",
        "--configfile",
        str(path),
        "--replace-workflow-config",
        "--config",
        f"raw_dir={raw_dir}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]

    assert job_counts(output) == {"prepare": 2, "hpsearch_train": 16, "hpsearch_select": 1, "hpsearch": 1, "total": 20}

    trials = grid_trials({"grid": grid})
    assert [t.id for t in trials] == ["g0-a0.05-e0-n2", "g0-a0.05-e0-n3", "g0.4-a0.05-e0-n2", "g0.4-a0.05-e0-n3"]
    commands = [line for line in output.splitlines() if "carlrar train" in line]
    assert len(commands) == 16
    for dataset in ("sst2", "ag_news"):
        for trial in trials:
            for seed in (1, 3):
                out = f"results/hpsearch_test/hpsearch/{dataset}/{trial.id}/seed{seed}"
                [command] = [c for c in commands if f"--out {out} " in c]
                for override in trial.overrides(dataset, epochs=1):  # e.g. datasets.sst2.freelb.init_mag=0.4
                    assert f"--set {override}" in command, command
                assert f"--dataset {dataset} --method freelb --seed {seed} " in command
                assert f"results/hpsearch_test/logs/hpsearch/{dataset}/{trial.id}/seed{seed}.log" in command
    for name in ("sst2/best.yaml", "ag_news/best.yaml", "freelb_best.yaml", "trials.md", "trials.csv"):
        assert f"results/hpsearch_test/hpsearch/{name}" in output
    assert "carlrar hpsearch-select --metrics" in output


def test_out_of_bounds_grid_stops_the_workflow(tmp_path: Path, raw_dir: Path) -> None:
    path = _search_config(tmp_path, {"init_mag": [0.0, 0.9]})
    result = snakemake(
        "-n", "hpsearch", "--configfile", str(path), "--replace-workflow-config", "--config", f"raw_dir={raw_dir}"
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "'hpsearch.grid.init_mag': 0.9 is outside the paper's bounds" in output and "[0, 0.8]" in output, output
    assert len(output.splitlines()) < 15
