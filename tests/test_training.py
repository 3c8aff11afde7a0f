"""The training loop: it learns, it resumes exactly and it records what it did (GPU choice: test_devices.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from helpers.configs import tiny_config
from safetensors.torch import load_file

from carlrar import training
from carlrar.batching import EncodedSplit, evaluate
from carlrar.checkpoints import load_trained_run
from carlrar.config import from_mapping
from carlrar.data import prepare_dataset
from carlrar.errors import CarlrarError, TrainingDiverged
from carlrar.hardware import cpu_has_native_bf16
from carlrar.methods import carl_schedule
from carlrar.rar_warmup import warm_up_reconstructor
from carlrar.storage import sha256_file
from carlrar.training import train


@pytest.fixture(scope="module")
def learnable_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A task a tiny model must learn: the label is whether the sentence says 'good' or 'bad'."""
    root = tmp_path_factory.mktemp("raw")
    (root / "sst2").mkdir()
    nouns = ["film", "plot", "cast", "story", "score", "script", "ending", "pace"]

    rng = random.Random(0)

    def rows(n: int) -> str:
        lines = [
            f"a {rng.choice(nouns)} so {'good' if i % 2 else 'bad'} {rng.choice(nouns)} \t{i % 2}" for i in range(n)
        ]
        return "sentence\tlabel\n" + "\n".join(lines) + "\n"

    (root / "sst2/train.tsv").write_text(rows(40))
    (root / "sst2/dev.tsv").write_text(rows(16))
    return root


@pytest.fixture(scope="module")
def learnable_data(tmp_path_factory: pytest.TempPathFactory, learnable_raw: Path) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "sst2"
    prepare_dataset(from_mapping(tiny_config(checkpoint_every=3)), "sst2", learnable_raw, out)
    return out


def test_base_learns_a_learnable_task(tmp_path: Path, learnable_data: Path) -> None:
    result = train(
        from_mapping(tiny_config(checkpoint_every=3, epochs=8)),
        "sst2",
        "base",
        1,
        learnable_data,
        tmp_path / "run",
        "cpu",
    )
    metrics = result.metrics
    assert metrics["dev_accuracy"] >= 0.9, metrics["history"]
    assert metrics["history"][0]["dev_accuracy"] <= metrics["dev_accuracy"]


def test_metrics_record_config_versions_and_data(tmp_path: Path, learnable_data: Path) -> None:
    metrics = train(
        from_mapping(tiny_config(checkpoint_every=3, epochs=1)),
        "sst2",
        "freelb",
        2,
        learnable_data,
        tmp_path / "r",
        "cpu",
    ).metrics
    on_disk = json.loads((tmp_path / "r/metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in (
        "dev_accuracy",
        "test_accuracy",
        "eval_accuracy",
        "evaluated_split",
        "params",
        "steps",
        "train_seconds",
        "samples_per_second",
        "history",
        "config",
        "versions",
        "data",
    ):
        assert key in on_disk, key
    manifest = json.loads((learnable_data / "manifest.json").read_text())
    assert on_disk["data"]["splits"]["train"] == manifest["splits"]["train"]["sha256"]
    assert on_disk["config"]["dataset"]["freelb"]["adv_steps"] == 2
    assert on_disk["test_accuracy"] is None and on_disk["evaluated_split"] == "dev"
    assert on_disk["steps"] == 5  # ceil(40 / 8) steps, one epoch
    assert {"torch", "transformers", "carlrar"} <= set(on_disk["versions"])
    assert on_disk["precision"] == {
        "requested": "fp32",  # config/smoke.yaml's: the tests' numbers do not depend on the CPU's bf16
        "used": "fp32",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
    }
    # checkpoints are safetensors + JSON, never pickle
    assert sorted(p.name for p in (tmp_path / "r/checkpoint").iterdir()) == ["state.json", "state.safetensors"]
    assert (tmp_path / "r/best/weights.safetensors").is_file()


def test_eval_predictions_are_the_reported_accuracy(tmp_path: Path, learnable_data: Path) -> None:
    metrics = train(
        from_mapping(tiny_config(epochs=2)), "sst2", "base", 3, learnable_data, tmp_path / "r", "cpu"
    ).metrics
    predictions = pd.read_parquet(tmp_path / "r" / metrics["predictions"])
    dev = pd.read_parquet(learnable_data / "dev.parquet")
    assert list(predictions["row"]) == list(range(len(dev)))
    assert list(predictions["gold"]) == list(dev["label"])
    assert (predictions["gold"] == predictions["pred"]).mean() == pytest.approx(metrics["eval_accuracy"])


def test_rar_starts_from_one_shared_warmup(tmp_path: Path, learnable_data: Path) -> None:
    """A run given the dataset's warm-up equals a run that makes its own; a warm-up of other settings is refused."""
    warm = {"warmup_steps": 15, "warmup_learning_rate": 0.05, "warmup_batch_size": 8}
    config = from_mapping(tiny_config(epochs=2, rar=warm))
    own = train(config, "sst2", "rar", 4, learnable_data, tmp_path / "own", "cpu").metrics
    accuracy = own["reconstruction_dev_token_accuracy"]
    assert accuracy["after_warmup"] > accuracy["before_warmup"] + 0.2, accuracy
    assert 0.0 <= accuracy["end"] <= 1.0

    record = warm_up_reconstructor(config, "sst2", learnable_data, tmp_path / "shared", "cpu")
    assert record["dev_token_accuracy_after"] == accuracy["after_warmup"] and len(record["losses"]) == 15
    shared = train(config, "sst2", "carl_rar", 4, learnable_data, tmp_path / "carl_rar", "cpu", tmp_path / "shared")
    assert shared.metrics["reconstruction_dev_token_accuracy"]["after_warmup"] == accuracy["after_warmup"]
    again = train(config, "sst2", "rar", 4, learnable_data, tmp_path / "again", "cpu", tmp_path / "shared").metrics
    assert again["history"] == own["history"] and again["reconstruction_dev_token_accuracy"] == accuracy
    assert not (tmp_path / "again/rar_warmup").exists()

    other = from_mapping(tiny_config(epochs=2, rar={**warm, "warmup_steps": 16}))
    with pytest.raises(CarlrarError, match="made with other warmup than this run"):
        train(other, "sst2", "rar", 4, learnable_data, tmp_path / "other", "cpu", tmp_path / "shared")


class _Killed(Exception):
    """Stands for the process being killed."""


@pytest.mark.parametrize(
    ("method", "init_mag"),
    [("base", 0.6), ("freelb", 0.6), ("carl", 0.6), ("rar", 0.6), ("carl", 0.0)],
    ids=["base", "freelb", "carl", "rar", "carl-zero-init"],  # zero init: pass 1 is CARL's clean view
)
def test_killed_run_resumes_to_identical_metrics(
    tmp_path: Path, learnable_data: Path, method: str, init_mag: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    mapping = tiny_config(checkpoint_every=3, epochs=3)
    mapping["datasets"]["sst2"]["freelb"]["init_mag"] = init_mag
    config = from_mapping(mapping)
    reference = train(config, "sst2", method, 7, learnable_data, tmp_path / "reference", "cpu").metrics

    real_step = training.adversarial_backward
    calls = {"n": 0}

    def dies_at_step_fourteen(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 14:  # mid-epoch (5 steps per epoch), one step after the checkpoint of step 12
            raise _Killed
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "adversarial_backward", dies_at_step_fourteen)
    with pytest.raises(_Killed):
        train(config, "sst2", method, 7, learnable_data, tmp_path / "resumed", "cpu")
    monkeypatch.setattr(training, "adversarial_backward", real_step)
    state = json.loads((tmp_path / "resumed/checkpoint/state.json").read_text())
    assert state["progress"]["step"] == 12 and state["progress"]["batch_in_epoch"] == 2
    resumed = train(config, "sst2", method, 7, learnable_data, tmp_path / "resumed", "cpu").metrics

    for key in ("dev_accuracy", "eval_accuracy", "best_step", "steps", "history", "params"):
        assert resumed[key] == reference[key], key
    ref_weights = load_file(str(tmp_path / "reference/best/weights.safetensors"))
    new_weights = load_file(str(tmp_path / "resumed/best/weights.safetensors"))
    assert ref_weights.keys() == new_weights.keys()
    for name in ref_weights:
        assert torch.equal(ref_weights[name], new_weights[name]), name
    if method == "carl":
        ref_state = load_file(str(tmp_path / "reference/checkpoint/state.safetensors"))
        new_state = load_file(str(tmp_path / "resumed/checkpoint/state.safetensors"))
        banks = [k for k in ref_state if "bank_" in k or k.endswith(("z_a", "z_o"))]
        assert banks and all(torch.equal(ref_state[k], new_state[k]) for k in banks)


def test_rerunning_a_finished_run_changes_nothing(tmp_path: Path, learnable_data: Path) -> None:
    config = from_mapping(tiny_config(checkpoint_every=3, epochs=1))
    first = train(config, "sst2", "base", 1, learnable_data, tmp_path / "r", "cpu").metrics
    again = train(config, "sst2", "base", 1, learnable_data, tmp_path / "r", "cpu").metrics
    assert again["history"] == first["history"] and again["steps"] == first["steps"]


def test_carl_schedule_writes_banks_a_full_epoch_before_tau() -> None:
    assert carl_schedule(6315, None, 2105) == (6315, 4210)  # SST-2: tau = 3 epochs
    assert carl_schedule(7750, None, 3750) == (7750, 3750)  # AG's News: banks written during epoch 2
    assert carl_schedule(None, 2, 10) == (20, 10)
    with pytest.raises(CarlrarError, match="at least one epoch"):
        carl_schedule(5, None, 10)


def test_carl_with_too_few_negatives_fails_at_start(tmp_path: Path, learnable_data: Path) -> None:
    config = tiny_config(checkpoint_every=3)
    config["datasets"]["sst2"]["carl"]["negatives"] = 21  # each class has 20 rows of the other label
    with pytest.raises(CarlrarError, match="CARL on sst2: class 0"):
        train(from_mapping(config), "sst2", "carl", 1, learnable_data, tmp_path / "r", "cpu")
    assert not (tmp_path / "r").exists()


def test_missing_data_is_one_clear_error(tmp_path: Path) -> None:
    from carlrar.cli import main

    code = main(
        [
            "train",
            "--config",
            "config/smoke.yaml",
            "--dataset",
            "sst2",
            "--method",
            "base",
            "--seed",
            "1",
            "--data",
            str(tmp_path / "nothing"),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2


# --- run identity: a checkpoint is resumed only by the run that wrote it ------------------------------------------


def folder_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes, hidden ones included: a refusal must change none of them."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def killed_at_step(monkeypatch: pytest.MonkeyPatch, step: int, *args) -> None:
    """Run train(*args) and stand for a kill at the given optimizer step (after the checkpoints before it)."""
    real_step = training.adversarial_backward
    calls = {"n": 0}

    def dies(*a, **kw):
        calls["n"] += 1
        if calls["n"] == step:
            raise _Killed
        return real_step(*a, **kw)

    monkeypatch.setattr(training, "adversarial_backward", dies)
    with pytest.raises(_Killed):
        train(*args)
    monkeypatch.setattr(training, "adversarial_backward", real_step)


def test_checkpoint_of_another_configuration_is_refused_then_replaced(
    tmp_path: Path, learnable_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed with one learning rate, rerun with another: refused untouched; --restart-if-changed starts over."""
    slow, fast = (from_mapping(tiny_config(checkpoint_every=3, learning_rate=lr)) for lr in (1e-3, 3e-3))
    run = tmp_path / "run"
    killed_at_step(monkeypatch, 8, slow, "sst2", "base", 7, learnable_data, run, "cpu")
    before = folder_snapshot(tmp_path)
    for config, method in ((fast, "base"), (slow, "freelb")):
        with pytest.raises(CarlrarError) as refused:
            train(config, "sst2", method, 7, learnable_data, run, "cpu")
        message = str(refused.value)
        assert "--restart" in message and "\n" not in message
        assert ("training.learning_rate 0.001 -> 0.003" if method == "base" else "method base -> freelb") in message
        assert folder_snapshot(tmp_path) == before

    replaced = train(fast, "sst2", "base", 7, learnable_data, run, "cpu", restart="if-changed").metrics
    fresh = train(fast, "sst2", "base", 7, learnable_data, tmp_path / "fresh", "cpu").metrics
    assert replaced["history"] == fresh["history"] and replaced["config"]["training"]["learning_rate"] == 3e-3
    assert replaced["run_fingerprint"] == fresh["run_fingerprint"]
    assert_same_weights(tmp_path / "fresh", run)


def test_restart_if_changed_still_resumes_its_own_checkpoint(
    tmp_path: Path, learnable_data: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = from_mapping(tiny_config(checkpoint_every=3))
    killed_at_step(monkeypatch, 8, config, "sst2", "carl", 7, learnable_data, tmp_path / "run", "cpu")
    with caplog.at_level("INFO", logger="carlrar.training"):
        resumed = train(config, "sst2", "carl", 7, learnable_data, tmp_path / "run", "cpu", restart="if-changed")
    assert "resumed" in caplog.text and "at step 6" in caplog.text
    assert resumed.metrics["steps"] == 15


def test_data_of_another_sample_or_an_old_checkpoint_is_refused(
    tmp_path: Path, learnable_data: Path, learnable_raw: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = from_mapping(tiny_config(checkpoint_every=3))
    killed_at_step(monkeypatch, 5, config, "sst2", "base", 1, learnable_data, tmp_path / "run", "cpu")
    smaller = tiny_config()
    smaller["datasets"]["sst2"]["per_class"]["train"] = 18  # another sample, prepared under the same data settings
    prepare_dataset(from_mapping(smaller), "sst2", learnable_raw, tmp_path / "other")
    with pytest.raises(CarlrarError, match=r"another run \(data_sha256.train "):
        train(config, "sst2", "base", 1, tmp_path / "other", tmp_path / "run", "cpu")

    state_path = tmp_path / "run/checkpoint/state.json"
    state = json.loads(state_path.read_text())
    del state["run_identity"]
    state_path.write_text(json.dumps(state))
    with pytest.raises(CarlrarError, match="earlier carlrar that recorded no run identity; rerun with --restart"):
        train(config, "sst2", "base", 1, learnable_data, tmp_path / "run", "cpu")
    again = train(config, "sst2", "base", 1, learnable_data, tmp_path / "run", "cpu", restart="always").metrics
    assert again["steps"] == 15 and again["history"][0]["step"] == 5


def assert_same_weights(reference: Path, other: Path) -> None:
    ref_weights = load_file(str(reference / "best/weights.safetensors"))
    new_weights = load_file(str(other / "best/weights.safetensors"))
    assert ref_weights.keys() == new_weights.keys()
    for name in ref_weights:
        assert torch.equal(ref_weights[name], new_weights[name]), name


# --- divergence: the first non-finite loss or gradient stops the run, nothing of it is written ---------------------


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_first_non_finite_step_stops_the_run_keeping_the_last_good_checkpoint(
    tmp_path: Path, learnable_data: Path, monkeypatch: pytest.MonkeyPatch, poison: str
) -> None:
    real_step = training.adversarial_backward
    calls = {"n": 0}

    def goes_nan_at_step_eight(model, *args, **kwargs):
        out = real_step(model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 8:
            if poison == "loss":
                out.losses["ce"] = float("nan")
            else:
                next(model.parameters()).grad.fill_(float("inf"))
        return out

    monkeypatch.setattr(training, "adversarial_backward", goes_nan_at_step_eight)
    run = tmp_path / "run"
    config = from_mapping(tiny_config(checkpoint_every=3, max_grad_norm=0.0 if poison == "gradient" else 1.0))
    with pytest.raises(TrainingDiverged) as stopped:
        train(config, "sst2", "freelb", 1, learnable_data, run, "cpu")
    message = str(stopped.value)
    assert "at step 8 (epoch 2, batch 3)" in message and "\n" not in message
    assert ("(ce nan)" if poison == "loss" else "gradient norm inf") in message
    assert "last good checkpoint (step 6)" in message and "--restart" in message
    assert json.loads((run / "checkpoint/state.json").read_text())["progress"]["step"] == 6
    best = load_file(str(run / "best/weights.safetensors"))
    assert all(torch.isfinite(value).all() for value in best.values())
    assert not (run / "metrics.json").exists()


def test_a_run_with_non_finite_weights_is_refused(tmp_path: Path, learnable_data: Path) -> None:
    from safetensors.torch import save_file

    train(from_mapping(tiny_config(epochs=1)), "sst2", "base", 1, learnable_data, tmp_path / "run", "cpu")
    path = tmp_path / "run/best/weights.safetensors"
    weights = load_file(str(path))
    weights["model.classifier.weight"][0, 0] = float("nan")
    save_file(weights, str(path))
    with pytest.raises(CarlrarError, match=r"is not the weights the run's metrics.json describes"):
        load_trained_run(tmp_path / "run")  # edited after training: refused before its values are read
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())  # as if training had ended so
    metrics["best_weights_sha256"] = sha256_file(path)
    (tmp_path / "run/metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(CarlrarError, match=r"non-finite weights \(1 tensors, e.g. model.classifier.weight\)"):
        load_trained_run(tmp_path / "run")


def test_a_test_evaluated_run_passes_over_its_test_split_once_at_the_end(
    tmp_path: Path, raw_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AG's News style (evaluate: test): the final pass gives both the predictions and the test accuracy."""
    ag_news = {"per_class": {"train": 6, "dev": 2, "test": "all"}, "evaluate": "test", "batch_size": 8}
    config = from_mapping(tiny_config({"datasets": {"ag_news": ag_news}}, epochs=1))
    prepare_dataset(config, "ag_news", raw_dir, tmp_path / "data")
    passes: list[int] = []
    evaluate = training.evaluate

    def counted(model, split, *args, **kwargs):
        passes.append(len(split))
        return evaluate(model, split, *args, **kwargs)

    monkeypatch.setattr(training, "evaluate", counted)
    metrics = train(config, "ag_news", "base", 1, tmp_path / "data", tmp_path / "run", "cpu").metrics
    assert passes == [8] * len(metrics["history"]) + [16]  # the dev evaluations, then test once
    predictions = pd.read_parquet(tmp_path / "run" / metrics["predictions"])
    assert metrics["test_accuracy"] == metrics["eval_accuracy"] == (predictions["gold"] == predictions["pred"]).mean()


class LengthParity(torch.nn.Module):
    """Stands in for a classifier: predicts the parity of each sequence's length, and records each batch's width."""

    def __init__(self) -> None:
        super().__init__()
        self.widths: list[int] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        self.widths.append(input_ids.shape[1])
        odd = attention_mask.sum(-1) % 2
        return SimpleNamespace(logits=torch.stack([1 - odd, odd], dim=-1).float())


def test_evaluation_pads_batches_of_similar_length_and_keeps_the_split_s_order() -> None:
    lengths = [1, 9, 2, 8, 3, 7]
    split = EncodedSplit(ids=[[5] * n for n in lengths], labels=torch.tensor([n % 2 for n in lengths]))
    model = LengthParity()
    accuracy, predictions = evaluate(model, split, 2, 0, torch.device("cpu"))
    assert model.widths == [2, 7, 9]  # in the split's order the batches would be 9, 8 and 7 wide
    assert predictions.tolist() == [n % 2 for n in lengths] and accuracy == 1.0
