"""k-PGD at evaluation time (SPEC 7): the ball, the clean limit, attack strength, frozen parameters, RAR's text.

A toy classifier learns a separable task (the label is which of two marker tokens a sentence holds), so that
accuracy under attack means something. PGD's final iterate is not monotone per example in epsilon or k, so
the strength tests compare aggregate accuracy over 64 examples on well-separated grids, every attack starting
from the same seeded random directions.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers.configs import tiny_config
from helpers.models import TINY_BERT

from carlrar import adversary, attacks
from carlrar.adversary import Batch, autocast_context
from carlrar.attacks import attack_split, pgd_attack, random_start, text_samples
from carlrar.cli import main
from carlrar.config import AnalysisConfig, from_mapping, load_schema
from carlrar.data import prepare_dataset
from carlrar.models import load_model
from carlrar.reconstruction import build_reconstructor, decode_argmax, reconstruction_loss
from carlrar.training import train

MARKERS = (1102, 1101)  # label 0 / label 1; filler words are ids 1000-1099


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and an oversubscribed CPU makes several threads crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_batch(n: int, seed: int) -> Batch:
    """[CLS] 4-11 filler words, one of them replaced by the label's marker, [SEP], then padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (n,), generator=g)
    width = int(lengths.max()) + 2
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    labels = torch.randint(0, 2, (n,), generator=g)
    for i in range(n):
        words = torch.randint(1000, 1100, (int(lengths[i]),), generator=g)
        words[int(torch.randint(0, int(lengths[i]), (1,), generator=g))] = MARKERS[int(labels[i])]
        seq = torch.cat([torch.tensor([101]), words, torch.tensor([102])])
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return Batch(ids, mask, labels, torch.arange(n))


@pytest.fixture(scope="module")
def toy():
    """A tiny classifier trained for 30 steps: right on all 64 test examples, yet breakable at epsilon 0.4."""
    torch.manual_seed(0)
    model, _ = load_model("random:minilm-l6", 2, {**TINY_BERT, "vocab_size": 1200})
    data, test = toy_batch(256, 1), toy_batch(64, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        rows = torch.randint(0, 256, (32,))
        logits = model(input_ids=data.input_ids[rows], attention_mask=data.attention_mask[rows]).logits
        optimizer.zero_grad()
        F.cross_entropy(logits, data.labels[rows]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model, test


def accuracy_under_attack(model, batch: Batch, epsilon: float, steps: int) -> float:
    result = pgd_attack(model, batch, epsilon, steps, generator=torch.Generator().manual_seed(0))
    return float((result.attacked_pred == batch.labels).float().mean())


def clean_predictions(model, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.argmax(-1)


def test_perturbation_stays_in_the_ball_and_off_padding(toy) -> None:
    model, batch = toy
    padding = batch.attention_mask == 0
    assert padding.any()
    for epsilon, steps in [(0.3, 0), (0.3, 5), (2.0, 10)]:
        result = pgd_attack(model, batch, epsilon, steps)
        assert result.delta.dtype == torch.float32
        assert torch.all(result.perturbation_norm <= epsilon * (1 + 1e-5))
        assert torch.all(result.delta[padding] == 0)
        assert torch.allclose(result.perturbation_norm, result.delta.flatten(1).norm(dim=1))
    # ascent drives delta out to (near) the boundary: 5 steps of epsilon / 4 along g/||g||, then projections
    norms = pgd_attack(model, batch, 0.3, 5).perturbation_norm
    assert torch.all(norms > 0.3 * 0.8) and norms.mean() > 0.3 * 0.98


def test_random_start_is_seeded_inside_the_ball_and_scales_with_epsilon() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    first = random_start((2, 4, 8), mask, 0.5, torch.Generator().manual_seed(3))
    again = random_start((2, 4, 8), mask, 0.5, torch.Generator().manual_seed(3))
    larger = random_start((2, 4, 8), mask, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and torch.allclose(larger, 2 * first)
    assert torch.all(first.flatten(1).norm(dim=1) <= 0.5 + 1e-6)
    assert torch.all(first[mask == 0] == 0) and torch.all(first[mask == 1].abs().sum(-1) > 0)


def test_epsilon_zero_gives_exactly_the_clean_predictions(toy) -> None:
    model, batch = toy
    result = pgd_attack(model, batch, 0.0, 10)
    assert torch.equal(result.attacked_pred, result.clean_pred)
    assert torch.equal(result.clean_pred, clean_predictions(model, batch))
    assert torch.all(result.delta == 0) and torch.all(result.euclidean == 0)
    assert torch.allclose(result.cosine, torch.ones_like(result.cosine))


def test_accuracy_does_not_rise_with_epsilon_or_steps(toy) -> None:
    model, batch = toy
    clean = float((clean_predictions(model, batch) == batch.labels).float().mean())
    assert clean == 1.0
    by_epsilon = [accuracy_under_attack(model, batch, eps, 10) for eps in (0.0, 0.1, 0.4, 0.8)]
    by_steps = [accuracy_under_attack(model, batch, 0.4, k) for k in (0, 2, 10)]
    assert by_epsilon[0] == clean
    assert all(a >= b for a, b in zip(by_epsilon, by_epsilon[1:])), by_epsilon
    assert all(a >= b for a, b in zip(by_steps, by_steps[1:])), by_steps
    assert by_epsilon[-1] <= 0.25 and by_steps[-1] <= 0.75, (by_epsilon, by_steps)  # the attack does bite


def test_parameters_are_frozen_and_eval_mode_is_kept(toy) -> None:
    model, batch = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = pgd_attack(model, batch, 0.4, 3)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # a model handed over in train mode is attacked without dropout and handed back in train mode
    model.train()
    try:
        again = pgd_attack(model, batch, 0.4, 3)
        assert model.training
    finally:
        model.eval()
    assert torch.equal(again.attacked_pred, result.attacked_pred) and torch.equal(again.delta, result.delta)
    # gradients w.r.t. delta only, even when the caller is inside no_grad
    with torch.no_grad():
        assert torch.equal(pgd_attack(model, batch, 0.4, 3).delta, result.delta)


def test_unattacked_input_decodes_to_itself_through_a_copy_reconstructor() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_model("random:minilm-l6", 2, TINY_BERT)
    reconstructor = build_reconstructor(model, "random:minilm-l6")
    sentences = ["the film is good.", "a bad plot, sadly", "it was fine", "what a wonderful cast!"]
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    batch = Batch(
        enc["input_ids"],
        enc["attention_mask"],
        torch.zeros(len(sentences), dtype=torch.long),
        torch.arange(len(sentences)),
    )
    real = batch.attention_mask.bool()
    params = {id(p): p for p in [*model.parameters(), *reconstructor.parameters()]}.values()
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for step in range(400):
        model.train()
        tokens = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).tokens
        loss = reconstruction_loss(reconstructor(tokens), batch.input_ids, batch.attention_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9:
            model.eval()
            with torch.no_grad():
                tokens = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).tokens
                if torch.equal(reconstructor(tokens).argmax(-1)[real], batch.input_ids[real]):
                    break
    else:
        pytest.fail("the copy reconstructor did not become exact")
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    result = pgd_attack(model, batch, 0.0, 10, return_tokens=True)
    with torch.no_grad():
        decoded = decode_argmax(reconstructor(result.attacked_tokens), batch.attention_mask, tokenizer)
    originals = [tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(batch.input_ids, real)]
    assert decoded == originals
    assert decoded[0] == "the film is good."


# --- whole runs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(prepared data, base run, rar run) on a task the tiny model learns: 'good' or 'bad' in the sentence."""
    root = tmp_path_factory.mktemp("attack_runs")
    (root / "raw/sst2").mkdir(parents=True)
    nouns = ["film", "plot", "cast", "story", "score", "script", "ending", "pace"]

    def rows(n: int, offset: int) -> str:
        lines = [
            f"a {'good' if i % 2 else 'bad'} {nouns[(i + offset) % 8]} {nouns[(i * 3 + offset) % 8]} \t{i % 2}"
            for i in range(n)
        ]
        return "sentence\tlabel\n" + "\n".join(lines) + "\n"

    (root / "raw/sst2/train.tsv").write_text(rows(40, 0))
    (root / "raw/sst2/dev.tsv").write_text(rows(16, 5))
    config = from_mapping(tiny_config())
    prepare_dataset(config, "sst2", root / "raw", root / "data")
    for method in ("base", "rar"):
        train(config, "sst2", method, 1, root / "data", root / method, "cpu")
    return root / "data", root / "base", root / "rar"


def test_attack_split_records_and_summary_agree(runs, tmp_path: Path) -> None:
    data, base, _ = runs
    summary = attack_split(base, data, tmp_path / "out", [0, 0.5, 4.0], steps=3, batch_size=5, device="cpu")
    on_disk = json.loads((tmp_path / "out/summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert (on_disk["dataset"], on_disk["method"], on_disk["seed"], on_disk["split"]) == ("sst2", "base", 1, "dev")
    assert on_disk["attack"]["steps"] == 3 and on_disk["attack"]["step_size_ratio"] == 0.25
    assert list(on_disk["epsilons"]) == ["0", "0.5", "4"]
    metrics = json.loads((base / "metrics.json").read_text())
    for eps, entry in on_disk["epsilons"].items():
        records = pd.read_parquet(tmp_path / f"out/records_eps{eps}.parquet")
        assert list(records.columns) == [
            "row",
            "gold",
            "clean_pred",
            "attacked_pred",
            "perturbation_norm",
            "cosine",
            "euclidean",
        ]
        assert entry["n"] == len(records) == 16 and records["row"].tolist() == list(range(16))
        correct_after = int((records["attacked_pred"] == records["gold"]).sum())
        originally = records["clean_pred"] == records["gold"]
        assert entry["attacked_accuracy"] * entry["n"] == pytest.approx(correct_after)
        assert entry["clean_accuracy"] == pytest.approx(metrics["dev_accuracy"])  # what training measured
        flipped = int((originally & (records["attacked_pred"] != records["gold"])).sum())
        assert entry["attack_success_rate"] == pytest.approx(flipped / originally.sum())
        assert entry["mean_cosine"] == pytest.approx(records["cosine"].mean())
        assert entry["mean_euclidean"] == pytest.approx(records["euclidean"].mean())
        assert (records["perturbation_norm"] <= float(eps) * (1 + 1e-5)).all()
    zero = on_disk["epsilons"]["0"]
    assert zero["attacked_accuracy"] == zero["clean_accuracy"] and zero["attack_success_rate"] == 0
    assert on_disk["epsilons"]["4"]["mean_euclidean"] > on_disk["epsilons"]["0.5"]["mean_euclidean"] > 0


def test_text_samples_and_cli(runs, tmp_path: Path) -> None:
    data, base, rar = runs
    assert (
        main(
            [
                "-q",
                "samples",
                "--run",
                str(rar),
                "--base-run",
                str(base),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "samples.json"),
                "--epsilon",
                "0.5",
                "--steps",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "samples.json").read_text())
    assert (report["dataset"], report["method"], report["seed"]) == ("sst2", "rar", 1)
    assert report["n_examples"] == 16 and report["n_changed"] == len(report["examples"])
    assert report["n_fool_base"] == sum(e["fools_base"] for e in report["examples"])
    for example in report["examples"]:
        assert example["decoded"] != example["original_decoded"]
        assert example["fools_base"] == (
            example["base_pred_original"] == example["gold"] != example["base_pred_decoded"]
        )
    # the same attack through the library gives the same report
    again = text_samples(rar, base, data, tmp_path / "again.json", epsilon=0.5, steps=3, device="cpu")
    assert again == report
    # a run without a reconstructor is refused with a one-line error
    assert (
        main(
            [
                "-q",
                "samples",
                "--run",
                str(base),
                "--base-run",
                str(base),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "x.json"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    # the workflow's way: the settings come from the config's analysis section, a flag replaces one of them
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**tiny_config(), "analysis": {"epsilons": [0.1], "steps": 2, "seed": 5}}))
    cli = ["-q", "attack", "--config", str(config), "--run", str(base), "--data", str(data), "--out"]
    assert main([*cli, str(tmp_path / "cli"), "--batch-size", "4", "--device", "cpu"]) == 0
    assert (tmp_path / "cli/records_eps0.1.parquet").is_file()
    attack = json.loads((tmp_path / "cli/summary.json").read_text())["attack"]
    assert (attack["steps"], attack["seed"], attack["batch_size"]) == (2, 5, 4)
    assert list(json.loads((tmp_path / "cli/summary.json").read_text())["epsilons"]) == ["0.1"]


# --- where the settings come from -----------------------------------------------------------------------------


def test_default_settings_are_the_schemas_and_follow_the_spec() -> None:
    """The library's keyword defaults are the schema's analysis defaults (one source), which are the paper's."""
    defaults = AnalysisConfig.defaults()
    assert defaults.epsilons == (0.02, 0.075, 0.1)  # Table 5
    assert defaults.steps == 10 and defaults.step_size_ratio == 0.25  # SPEC 7: k = 10 steps of epsilon / 4
    assert from_mapping(tiny_config()).analysis == defaults == attacks.ANALYSIS_DEFAULTS  # no analysis section
    assert {f.name for f in dataclasses.fields(AnalysisConfig)} == set(
        load_schema()["properties"]["analysis"]["properties"]
    )
    split = inspect.signature(attack_split).parameters
    samples = inspect.signature(text_samples).parameters
    for name in ("steps", "step_size_ratio", "batch_size", "seed"):
        assert split[name].default == samples[name].default == getattr(defaults, name), name
    assert split["epsilons"].default == defaults.epsilons and samples["epsilon"].default == defaults.samples_epsilon
    assert inspect.signature(pgd_attack).parameters["steps"].default == defaults.steps
    assert not [name for name in vars(attacks) if name.startswith("DEFAULT_")]


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    """What ``carlrar attack`` / ``samples`` hand to attack_split / text_samples (which are not run)."""
    calls: dict[str, dict] = {}

    def recorder(name: str):
        def record(*args, **kwargs):
            calls[name] = kwargs
            return {"n_changed": 0, "n_examples": 0, "n_fool_base": 0}

        return record

    monkeypatch.setattr(attacks, "attack_split", recorder("attack"))
    monkeypatch.setattr(attacks, "text_samples", recorder("samples"))
    return calls


def test_attack_and_samples_take_the_configs_analysis_and_flags_override_it(received, tmp_path: Path) -> None:
    analysis = {"epsilons": [0.3, 0.6], "steps": 4, "step_size_ratio": 0.5, "batch_size": 7, "seed": 9}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**tiny_config(), "analysis": {**analysis, "samples_epsilon": 0.2}}))
    attack = ["-q", "attack", "--run", "r", "--data", "d", "--out", "o"]
    samples = ["-q", "samples", "--run", "r", "--base-run", "b", "--data", "d", "--out", "o.json"]
    from_config = {**analysis, "epsilons": (0.3, 0.6), "device": "auto"}

    assert main([*attack, "--config", str(config)]) == 0
    assert received["attack"] == from_config
    assert main([*attack, "--config", str(config), "--steps", "2", "--epsilons", "0.1", "--device", "cpu"]) == 0
    assert received["attack"] == {**from_config, "steps": 2, "epsilons": (0.1,), "device": "cpu"}
    shared = {key: value for key, value in from_config.items() if key != "epsilons"}
    assert main([*samples, "--config", str(config)]) == 0
    assert received["samples"] == {**shared, "epsilon": 0.2}
    assert main([*samples, "--config", str(config), "--epsilon", "0.05", "--seed", "3", "--batch-size", "2"]) == 0
    assert received["samples"] == {**shared, "epsilon": 0.05, "seed": 3, "batch_size": 2}


def test_without_config_attack_and_samples_use_the_schemas_defaults(received) -> None:
    defaults = AnalysisConfig.defaults()
    shared = {
        "steps": defaults.steps,
        "step_size_ratio": defaults.step_size_ratio,
        "batch_size": defaults.batch_size,
        "seed": defaults.seed,
        "device": "auto",
    }
    assert main(["-q", "attack", "--run", "r", "--data", "d", "--out", "o"]) == 0
    assert received["attack"] == {**shared, "epsilons": defaults.epsilons}
    assert main(["-q", "samples", "--run", "r", "--base-run", "b", "--data", "d", "--out", "o", "--steps", "1"]) == 0
    assert received["samples"] == {**shared, "epsilon": defaults.samples_epsilon, "steps": 1}


def test_a_bf16_run_is_trained_and_attacked_in_bf16_on_the_cpu(runs, tmp_path: Path) -> None:
    """training.precision=bf16 autocasts on a CPU too; the attack uses the precision the run was trained in."""
    data, _, _ = runs
    config = from_mapping(tiny_config(precision="bf16", epochs=2))
    metrics = train(config, "sst2", "freelb", 1, data, tmp_path / "bf16", "cpu").metrics
    assert metrics["config"]["training"]["precision"] == "bf16"
    assert metrics["precision"]["requested"] == "bf16" and metrics["precision"]["used"] == "bf16"
    assert metrics["precision"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    summary = attack_split(tmp_path / "bf16", data, tmp_path / "out", [0.0, 0.5], steps=2, batch_size=8, device="cpu")
    assert summary["attack"]["autocast"] == "bfloat16"
    assert summary["epsilons"]["0"]["clean_accuracy"] == pytest.approx(metrics["dev_accuracy"])
    with autocast_context(torch.device("cpu"), torch.bfloat16):
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("used", "native_here", "autocast"),
    [("fp32", True, None), ("bf16", False, torch.bfloat16), ("bf16", True, torch.bfloat16)],
)
def test_attacks_use_the_precision_the_run_recorded(
    monkeypatch: pytest.MonkeyPatch, used: str, native_here: bool, autocast: torch.dtype | None
) -> None:
    """An ``auto`` run keeps what auto resolved to where it trained, even on a machine where auto means otherwise."""
    monkeypatch.setattr(adversary, "bf16_is_native", lambda device: native_here)
    metrics = {"config": {"training": {"precision": "auto"}}, "precision": {"requested": "auto", "used": used}}
    assert attacks.run_amp_dtype(metrics, torch.device("cpu")) is autocast


@pytest.mark.parametrize(
    ("setting", "trained_on", "autocast"),
    [
        ("auto", "cpu", None),
        ("auto", "cuda:0", torch.bfloat16),
        ("bf16", "cpu", torch.bfloat16),
        ("fp32", "cuda", None),
    ],
)
def test_runs_from_before_the_record_read_auto_as_it_meant_then(
    monkeypatch: pytest.MonkeyPatch, setting: str, trained_on: str, autocast: torch.dtype | None
) -> None:
    """Older metrics.json files have no ``precision`` record: their auto meant bf16 on CUDA, fp32 on a CPU."""
    monkeypatch.setattr(adversary, "bf16_is_native", lambda device: True)
    metrics = {"config": {"training": {"precision": setting}}, "device": trained_on}
    assert attacks.run_amp_dtype(metrics, torch.device("cpu")) is autocast
