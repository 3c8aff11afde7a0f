"""results/<run>/timing.md (workflow/scripts/timing_summary.py): per-rule times and the precision the runs used."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers.paths import ROOT

SCRIPT = ROOT / "workflow" / "scripts" / "timing_summary.py"
AVX2_AUTO = {"requested": "auto", "used": "fp32", "cpu_capability": "AVX2", "cpu_native_bf16": False}


def benchmark(run: Path, rule: str, name: str, wall: float, cpu: float) -> None:
    path = run / "benchmarks" / rule / f"{name}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"s\th:m:s\tmax_rss\tcpu_time\n{wall}\t0:00:{wall:02.0f}\t100\t{cpu}\n")


def metrics(run: Path, method: str, precision: dict | None) -> None:
    path = run / "runs" / "sst2" / method / "seed1" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"method": method, **({"precision": precision} if precision else {})}))


def summarise(run: Path) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, str(SCRIPT), str(run), "--wall-seconds", "125", "--command", "make quick"]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_timing_states_rules_and_the_precision_the_runs_recorded(tmp_path: Path) -> None:
    benchmark(tmp_path, "train", "a", 50, 40)
    benchmark(tmp_path, "train", "b", 30, 20)
    benchmark(tmp_path, "attack", "a", 10, 5)
    metrics(tmp_path, "base", AVX2_AUTO)
    metrics(tmp_path, "freelb", AVX2_AUTO)
    metrics(tmp_path, "carl", None)
    assert summarise(tmp_path).returncode == 0
    text = (tmp_path / "timing.md").read_text()
    assert "Wall time: **2 min 05 s**" in text and "CPU time of all jobs: 65 s" in text
    assert "| train  |      2 |       80 |      60 |" in text
    assert (
        "Precision of the training runs (their metrics.json): fp32 (training.precision auto; CPU capability AVX2, "
        "no native bf16) in 2 of 3 runs; not recorded (metrics.json from before the record) in 1 of 3 runs."
    ) in text


def test_without_run_folders_there_is_no_precision_line(tmp_path: Path) -> None:
    benchmark(tmp_path, "prepare", "sst2", 1, 1)
    assert summarise(tmp_path).returncode == 0
    assert "Precision" not in (tmp_path / "timing.md").read_text()


def test_no_benchmarks_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = summarise(tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("timing_summary: no benchmark files under") and result.stderr.count("\n") == 1
