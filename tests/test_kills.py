"""Real SIGKILLs from outside: `carlrar train`, `attack` and `samples` killed at seeded random moments, then run
again with the same command, end with the outputs of an uninterrupted run (test_fault_injection.py covers every
file-system operation of training in-process; this covers what only a real process shows: open files, locks,
buffers, child threads). Slow: each case starts a few processes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers.configs import tiny_config
from helpers.paths import BIN
from helpers.raw import sst2_rows

pytestmark = pytest.mark.slow

KILLS = 3  # moments per command
CARLRAR = str(BIN / "carlrar")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("kills")
    (ws / "raw/sst2").mkdir(parents=True)
    (ws / "raw/sst2/train.tsv").write_text(sst2_rows(48))
    (ws / "raw/sst2/dev.tsv").write_text(sst2_rows(16))
    config = tiny_config(epochs=2, checkpoint_every=2)
    config["training"]["rar"] = {"warmup_steps": 0}
    (ws / "config.yaml").write_text(yaml.safe_dump(config))
    _run(ws, "prepare", "--dataset", "sst2", "--raw-dir", "raw", "--out", "data")
    return ws


def _command(*args: str) -> list[str]:
    return [CARLRAR, args[0], "--config", "config.yaml", *args[1:]] if args[0] != "attack" else [CARLRAR, *args]


def _run(ws: Path, *args: str) -> float:
    start = time.monotonic()
    result = subprocess.run(_command(*args), cwd=ws, capture_output=True, text=True, timeout=600, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return time.monotonic() - start


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CARLRAR_GPU_LEASE": "off", "TQDM_DISABLE": "1"}


def _killed_at(ws: Path, delay: float, *args: str) -> None:
    process = subprocess.Popen(
        _command(*args), cwd=ws, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()


def _train(out: str, method: str) -> tuple[str, ...]:
    return ("train", "--dataset", "sst2", "--method", method, "--seed", "1", "--data", "data", "--out", out,
            "--device", "cpu")  # fmt: skip


def _outcome(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    keep = ("dev_accuracy", "test_accuracy", "best_step", "steps", "best_weights_sha256", "run_identity")
    return {key: metrics[key] for key in keep} | {"predictions": (run / "eval_predictions.parquet").read_bytes()}


@pytest.mark.parametrize("method", ["carl", "rar"])
def test_train_killed_anywhere_then_rerun_ends_as_an_uninterrupted_run(workspace: Path, method: str) -> None:
    whole = _run(workspace, *_train(f"runs/{method}_whole", method))
    expected = _outcome(workspace / f"runs/{method}_whole")
    moments = random.Random(method).sample(range(1, 100), KILLS)
    for moment in moments:
        out = f"runs/{method}_killed_{moment}"
        _killed_at(workspace, whole * moment / 100, *_train(out, method))
        _run(workspace, *_train(out, method))
        assert _outcome(workspace / out) == expected, f"killed at {moment} % of {whole:.1f} s"
        assert not [p.name for p in (workspace / out).iterdir() if p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def finished(workspace: Path) -> Path:
    """Finished base and rar runs to attack."""
    for method in ("base", "rar"):
        _run(workspace, *_train(f"runs/{method}", method))
    return workspace


def _attack(out: str) -> tuple[str, ...]:
    return ("attack", "--run", "runs/base", "--data", "data", "--out", out, "--device", "cpu", "--steps", "2")


def _samples(out: str) -> tuple[str, ...]:
    return ("samples", "--run", "runs/rar", "--base-run", "runs/base", "--data", "data", "--out", out,
            "--device", "cpu", "--steps", "2")  # fmt: skip


def test_attack_killed_anywhere_leaves_nothing_or_the_whole_set(finished: Path) -> None:
    whole = _run(finished, *_attack("attack_whole"))
    expected = sorted(p.name for p in (finished / "attack_whole").iterdir())
    summary = json.loads((finished / "attack_whole/summary.json").read_text())["epsilons"]
    for moment in random.Random("attack").sample(range(1, 100), KILLS):
        out = finished / f"attack_{moment}"
        _killed_at(finished, whole * moment / 100, *_attack(out.name))
        assert not out.exists() or sorted(p.name for p in out.iterdir()) == expected  # one unit: all or nothing
        _run(finished, *_attack(out.name))
        assert json.loads((out / "summary.json").read_text())["epsilons"] == summary
        assert not [p.name for p in finished.iterdir() if p.name.startswith(f".{out.name}.")], "swap litter"


def test_samples_killed_anywhere_leave_nothing_or_the_whole_report(finished: Path) -> None:
    whole = _run(finished, *_samples("samples_whole.json"))
    expected = json.loads((finished / "samples_whole.json").read_text())
    for moment in random.Random("samples").sample(range(1, 100), KILLS):
        out = finished / f"samples_{moment}.json"
        _killed_at(finished, whole * moment / 100, *_samples(out.name))
        assert not out.exists() or json.loads(out.read_text()) == expected
        _run(finished, *_samples(out.name))
        assert json.loads(out.read_text()) == expected
