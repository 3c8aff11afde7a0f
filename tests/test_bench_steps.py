"""benchmarks/bench_steps.py: a short real run (its JSON, its tables, --report), its refusals, and that the figures
in benchmarks/README.md are the committed run's own."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_steps.py"
RESULTS = ROOT / "benchmarks" / "results"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("bench_steps")


@pytest.mark.slow  # about a minute on 2 idle cores: a real, if short, benchmark run
def test_quick_run_measures_every_method_and_reprints_from_its_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--quick", "--parts", "albert_ag,step-memory,memory", "--methods", "freelb,carl,carl_bank"]
    proc = run(*args, "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    case = report["albert_ag"]
    assert list(case["methods"]) == ["freelb", "carl", "carl_bank"]
    assert "carl" in case["methods"]["carl"]["losses"] and "carl" not in case["methods"]["carl_bank"]["losses"]
    assert set(case["ratios"]) == {"carl/freelb", "carl_bank/freelb"}
    assert case["shape"]["freelb"] == {
        "init_mag": 0.0,
        "adv_lr": 0.01,
        "adv_max_norm": 0.0,
        "adv_steps": 3,
        "norm_type": "l2",
    }
    assert all(case["peak_step_mib"][m] > 0 for m in case["methods"])
    assert case["peak_step_mib"]["carl"] > case["peak_step_mib"]["carl_bank"]  # L_D's graph and the kept first pass
    assert report["args"]["host_memory_kept"] is True and "albert" not in report
    sweep = report["memory"]
    assert {(r["classes"], r["m"]) for r in sweep} >= {(2, 1000), (2, 16000), (4, 16000)}
    for row in sweep:  # L_D's memory follows classes x m x dim, far below batch x m x dim at batch 32
        assert row["measured MiB"] < 1.25 * row["2 banks x C x m x dim x 4 B"] + 8
    reprinted = run("--report", str(out))
    assert reprinted.returncode == 0 and reprinted.stdout.strip() in proc.stdout


def test_bad_options_and_missing_data_are_refused_in_one_line(tmp_path: Path) -> None:
    bad = run("--parts", "albert,everything")
    assert bad.returncode == 2 and "--parts: unknown everything; choose from albert, albert_ag" in bad.stderr
    missing = run("--parts", "minilm", "--raw-dir", str(tmp_path))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"bench_steps.py: {tmp_path / 'sst2'} holds none of ['train.tsv']: pass --raw-dir, or leave out --parts minilm"
    ]


def test_the_readme_shows_the_committed_runs(bench: ModuleType) -> None:
    """Every saved run under benchmarks/results/ is in benchmarks/README.md exactly as --report prints it, so no table,
    ratio or goal there can be typed in or go stale; the main run covers every case, the memory sweep and the goals."""
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    runs = sorted(RESULTS.glob("bench_steps*.json"))
    assert RESULTS / "bench_steps.json" in runs
    for path in runs:
        report = json.loads(path.read_text())
        assert bench.render(report) in readme, path.name
    main = json.loads((RESULTS / "bench_steps.json").read_text())
    assert set(bench.CASES) <= set(main) and "memory" in main and bench.goals_report(main)
