"""Kill training anywhere, resume, and get the same run: the final metrics and best weights of an uninterrupted run.

A kill is simulated in-process, faithfully: just before one of the file-system operations training performs inside
its run folder (each rename, removal, safetensors or JSON write) or before an optimizer step, the folder is copied
as it is at that instant and the run is stopped. The copy then replaces whatever the stopping code cleaned up on its
way out (``finally`` blocks a real ``kill -9`` never runs), so the next start sees exactly what a killed process
leaves on disk: half-written temporary folders, a checkpoint swap between its two renames, and so on.
"""

from __future__ import annotations

import os
import pathlib
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers.configs import tiny_config
from safetensors.torch import load_file

from carlrar import checkpoints, rar_warmup, training
from carlrar.config import from_mapping
from carlrar.data import prepare_dataset
from carlrar.registry import METHOD_IDS as METHODS
from carlrar.storage import read_json
from carlrar.training import train


class Killed(BaseException):
    """Stands for SIGKILL; a BaseException, so that no ``except Exception`` in the code under test can catch it."""


@dataclass
class Event:
    kind: str  # replace, rmtree, save_file, write_text or step
    detail: str


@dataclass
class KillSwitch:
    """Counts the run folder's file-system events and training steps; kills at the one ``should_kill`` picks."""

    run_dir: Path
    snapshot_dir: Path
    should_kill: Callable[[int, Event], bool] = lambda index, event: False
    events: list[Event] = field(default_factory=list)
    dead: bool = False

    def tick(self, kind: str, *paths: object) -> None:
        if self.dead:  # the killed process runs nothing more: its clean-up is undone by the snapshot anyway
            return
        if kind != "step" and not any(self.run_dir in Path(str(p)).parents for p in paths):
            return
        event = Event(kind, " -> ".join(Path(str(p)).name for p in paths))
        self.events.append(event)
        if self.should_kill(len(self.events), event):
            self.dead = True
            shutil.rmtree(self.snapshot_dir, ignore_errors=True)
            if self.run_dir.exists():
                shutil.copytree(self.run_dir, self.snapshot_dir, symlinks=True)
            raise Killed(f"event {len(self.events)}: {event}")

    def leave_disk_as_killed(self) -> None:
        """Put the run folder back to its state at the kill instant."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.snapshot_dir.exists():
            shutil.copytree(self.snapshot_dir, self.run_dir, symlinks=True)


@pytest.fixture
def switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KillSwitch:
    """A kill switch wired into os.replace, shutil.rmtree, Path.write_text, safetensors' save_file and the step."""
    ks = KillSwitch(tmp_path / "run", tmp_path / "killed-state")
    real_replace, real_rmtree, real_write_text = os.replace, shutil.rmtree, pathlib.Path.write_text
    real_save_file, real_step = training.save_file, training.adversarial_backward

    def replace(src, dst, *args, **kwargs):
        ks.tick("replace", src, dst)
        return real_replace(src, dst, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        ks.tick("rmtree", path)
        return real_rmtree(path, *args, **kwargs)

    def write_text(self, *args, **kwargs):
        ks.tick("write_text", self)
        return real_write_text(self, *args, **kwargs)

    def save_file(tensors, filename, *args, **kwargs):
        ks.tick("save_file", filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    def step(*args, **kwargs):
        ks.tick("step")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    for module in (training, checkpoints, rar_warmup):  # best weights, checkpoints, the warm-up head
        monkeypatch.setattr(module, "save_file", save_file)
    monkeypatch.setattr(training, "adversarial_backward", step)
    return ks


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    (root / "sst2").mkdir()
    rng = random.Random(1)
    words = ["film", "plot", "cast", "story", "score", "ending"]

    def rows(n: int) -> str:
        lines = [f"the {rng.choice(words)} is {'good' if i % 2 else 'bad'} \t{i % 2}" for i in range(n)]
        return "sentence\tlabel\n" + "\n".join(lines) + "\n"

    (root / "sst2/train.tsv").write_text(rows(40))
    (root / "sst2/dev.tsv").write_text(rows(12))
    out = tmp_path_factory.mktemp("prepared") / "sst2"
    prepare_dataset(from_mapping(tiny_config()), "sst2", root, out)
    return out


def config_for(method: str) -> dict:
    """15 steps, checkpoints every 3 steps, evaluations at each epoch end; RAR makes its own warm-up."""
    warmup = {"warmup_steps": 4, "warmup_batch_size": 8, "warmup_learning_rate": 0.01} if method == "rar" else {}
    return tiny_config(checkpoint_every=3, epochs=3, rar=warmup)


def final_state(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor], pd.DataFrame]:
    metrics = read_json(run_dir / "metrics.json")
    kept = {key: metrics[key] for key in ("history", "dev_accuracy", "eval_accuracy", "best_step", "steps")}
    kept["run_fingerprint"] = metrics["run_fingerprint"]
    weights = load_file(str(run_dir / "best/weights.safetensors"))
    return kept, weights, pd.read_parquet(run_dir / "eval_predictions.parquet")


def run_with_kills(switch: KillSwitch, method: str, data: Path, plan: list[Callable[[int, Event], bool]]) -> int:
    """Start the run once per kill plan (each start killed where its plan says, if it gets there), then finish it.

    Returns how many starts were killed.
    """
    config = from_mapping(config_for(method))
    kills = 0
    for should_kill in [*plan, lambda index, event: False]:
        switch.should_kill, switch.events, switch.dead = should_kill, [], False
        try:
            train(config, "sst2", method, 5, data, switch.run_dir, "cpu")
        except Killed:
            kills += 1
            switch.leave_disk_as_killed()
            continue
        break
    return kills


def assert_same_run(reference: Path, resumed: Path) -> None:
    (ref_metrics, ref_weights, ref_predictions), (metrics, weights, predictions) = (
        final_state(reference),
        final_state(resumed),
    )
    assert metrics == ref_metrics
    assert weights.keys() == ref_weights.keys()
    for name, value in ref_weights.items():
        assert torch.equal(weights[name], value), name
    assert predictions.equals(ref_predictions)
    assert not [p.name for p in resumed.iterdir() if p.name.startswith(".")], "a kill left hidden litter behind"


def nth_match(n: int, predicate: Callable[[Event], bool]) -> Callable[[int, Event], bool]:
    """Kill at the n-th event the predicate accepts."""
    seen = {"n": 0}

    def should_kill(index: int, event: Event) -> bool:
        seen["n"] += predicate(event)
        return predicate(event) and seen["n"] == n

    return should_kill


def at_index(target: int) -> Callable[[int, Event], bool]:
    return lambda index, event: index == target


def between_renames(folder: str, n: int) -> Callable[[int, Event], bool]:
    """Kill the n-th replacement of ``folder`` after its first rename (old copy aside), before its second."""
    seen = {"n": 0, "armed": False}

    def should_kill(index: int, event: Event) -> bool:
        if seen["armed"]:
            return True
        if (
            event.kind == "replace"
            and event.detail.startswith(f"{folder} -> .{folder}.")
            and event.detail.endswith(".old")
        ):
            seen["n"] += 1
            seen["armed"] = seen["n"] == n
        return False

    return should_kill


def early(rng: random.Random, events: int) -> Callable[[int, Event], bool]:
    """A kill at a random point of the first eighth of a start, so that most starts get killed (their number is
    bounded) while progress still accumulates from start to start, spreading the kills over the whole run."""
    return at_index(rng.randint(1, max(1, events // 8)))


def best_written_checkpoint_not() -> Callable[[int, Event], bool]:
    """Kill after best/ was first written (step 5) and before that evaluation's checkpoint: the resumed start then
    replays step 5 and replaces best/ with a real two-rename swap, whatever the accuracy."""
    return nth_match(2, lambda e: e.kind == "save_file" and e.detail == "state.safetensors")


def reference_run(tmp_path: Path, switch: KillSwitch, method: str, data: Path) -> tuple[Path, int]:
    """The uninterrupted run, and how many kill points (events) it passes."""
    switch.should_kill, switch.events = (lambda index, event: False), []
    reference = tmp_path / "reference"
    switch.run_dir, real_run_dir = reference, switch.run_dir
    train(from_mapping(config_for(method)), "sst2", method, 5, data, reference, "cpu")
    switch.run_dir = real_run_dir
    return reference, len(switch.events)


def test_a_kill_between_the_renames_of_a_checkpoint_swap_resumes_from_that_checkpoint(
    tmp_path: Path, switch: KillSwitch, data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference, _ = reference_run(tmp_path, switch, "base", data)
    with caplog.at_level("INFO"):
        kills = run_with_kills(switch, "base", data, [between_renames("checkpoint", 2)])
    assert kills == 1
    assert "finished a swap a kill interrupted between its two renames" in caplog.text
    assert "at step 6 (epoch 1, batch 1)" in caplog.text, "the new copy (step 6) must be resumed, not step 0"
    assert_same_run(reference, switch.run_dir)


def targeted() -> list[Callable[[int, Event], bool]]:
    """Kills at the points most likely to lose work, in an order that reaches each of them (fresh per run)."""
    return [
        best_written_checkpoint_not(),
        between_renames("best", 1),
        between_renames("checkpoint", 2),
        nth_match(2, lambda e: e.kind == "write_text" and e.detail == "state.json"),  # a checkpoint half-written
        nth_match(1, lambda e: e.kind == "rmtree" and e.detail.endswith(".old")),  # a swap's old copy half-removed
    ]


@pytest.mark.parametrize("method", ["base", "carl"])
def test_random_kills_resume_to_the_uninterrupted_run(
    tmp_path: Path, switch: KillSwitch, data: Path, method: str
) -> None:
    reference, events = reference_run(tmp_path, switch, method, data)
    rng = random.Random(f"quick-{method}")
    plan = [*targeted()[:2], *(early(rng, events) for _ in range(3))]
    kills = run_with_kills(switch, method, data, plan)
    print(f"{method}: {events} kill points in an uninterrupted run, {kills} kills")
    assert kills >= 4, "most planned kills must fire for the test to mean something"
    assert_same_run(reference, switch.run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_survives_kills_at_every_kind_of_point(
    tmp_path: Path, switch: KillSwitch, data: Path, method: str
) -> None:
    """Five targeted kills (inside best/ and checkpoint swaps, mid-write, mid-removal) and ten random ones."""
    reference, events = reference_run(tmp_path, switch, method, data)
    rng = random.Random(f"slow-{method}")
    plan = [*targeted(), *(early(rng, events) for _ in range(10))]
    kills = run_with_kills(switch, method, data, plan)
    print(f"{method}: {events} kill points in an uninterrupted run, {kills} kills")
    assert kills >= 10, "most planned kills must fire for the test to mean something"
    assert_same_run(reference, switch.run_dir)
