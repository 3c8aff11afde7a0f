"""A catalogue of bad inputs, each given to the ``carlrar`` command line: one line on stderr naming the problem and
the way out, exit code 2, and the workspace byte for byte as it was (nothing written, moved or removed).

The workspace holds raw files, a prepared dataset and another sample of it, two finished runs (base and rar) and
two broken model folders; each case copies it, breaks one thing, runs one command and compares.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers.configs import tiny_config
from helpers.raw import sst2_rows
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from carlrar import checkpoints, data, training
from carlrar.cli import main
from carlrar.identity import OWNER_FILE
from carlrar.models import resolve_source

Case = Callable[[Path], list[str]]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors exit instead of returning
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workspace every case starts from (built once through the command line itself)."""
    ws = tmp_path_factory.mktemp("workspace")
    (ws / "raw/sst2").mkdir(parents=True)
    (ws / "raw/sst2/train.tsv").write_text(sst2_rows(40))
    (ws / "raw/sst2/dev.tsv").write_text(sst2_rows(16))
    (ws / "raw/ag_news").mkdir()
    for split in ("train", "test"):
        rows = "".join(f'"{c}","title {c} {i}","body {i}"\n' for i in range(6) for c in (1, 2, 3, 4))
        (ws / f"raw/ag_news/{split}.csv").write_text(rows)
    config = tiny_config(epochs=1, checkpoint_every=2)
    config["datasets"]["ag_news"] = {"per_class": {"train": 3, "dev": 1, "test": 2}}
    (ws / "config.yaml").write_text(yaml.safe_dump(config))
    (ws / "notes.txt").write_text("the user's own file\n")
    (ws / "empty").mkdir()
    other = ["--set", "datasets.sst2.per_class.train=18", "--set", "datasets.sst2.per_class.dev=6"]
    for name, extra in (("sst2", []), ("sst2_other", other)):
        assert main([*prepare_args(ws, out=f"data/{name}"), *extra]) == 0
    for method in ("base", "rar"):
        assert main(train_args(ws, method=method, out=f"runs/{method}")) == 0
    assert main(prepare_args(ws, "ag_news", out="data/ag_news")) == 0
    ag_news = train_args(ws, out="runs/ag_news", data="data/ag_news")
    assert main([*ag_news[:4], "ag_news", *ag_news[5:]]) == 0
    source = Path(resolve_source("minilm-l6"))
    for name in ("noweights", "truncated"):
        shutil.copytree(source, ws / "models" / name, ignore=shutil.ignore_patterns("model.safetensors", "1_*"))
    (ws / "models/truncated/model.safetensors").write_bytes(b"\x08\x00")
    return ws


@pytest.fixture
def ws(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ws"))


def prepare_args(ws: Path, dataset: str = "sst2", out: str = "data/new") -> list[str]:
    return [
        "prepare",
        "--config",
        f"{ws}/config.yaml",
        "--dataset",
        dataset,
        "--raw-dir",
        f"{ws}/raw",
        "--out",
        f"{ws}/{out}",
    ]


def train_args(
    ws: Path, *extra: str, method: str = "base", out: str = "runs/new", data: str = "data/sst2", seed: str = "1"
) -> list[str]:
    return [
        "train", "--config", f"{ws}/config.yaml", "--dataset", "sst2", "--method", method, "--seed", seed,
        "--data", f"{ws}/{data}", "--out", f"{ws}/{out}", "--device", "cpu", *extra,
    ]  # fmt: skip


def attack_args(ws: Path, *extra: str, run: str = "runs/base", data: str = "data/sst2") -> list[str]:
    return [
        "attack",
        "--run",
        f"{ws}/{run}",
        "--data",
        f"{ws}/{data}",
        "--out",
        f"{ws}/attack",
        "--device",
        "cpu",
        *extra,
    ]


def samples_args(
    ws: Path, *extra: str, run: str = "runs/rar", data: str = "data/sst2", out: str = "s.json"
) -> list[str]:
    return [
        "samples", "--run", f"{ws}/{run}", "--base-run", f"{ws}/runs/base", "--data", f"{ws}/{data}",
        "--out", f"{ws}/{out}", "--device", "cpu", *extra,
    ]  # fmt: skip


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def with_nan_weight(run: Path) -> None:
    """As if training had ended in a NaN weight: the run's metrics.json records the hash of these weights."""
    weights = load_file(str(run / "best/weights.safetensors"))
    weights["model.classifier.weight"][0, 0] = float("nan")
    save_file(weights, str(run / "best/weights.safetensors"))
    digest = hashlib.sha256((run / "best/weights.safetensors").read_bytes()).hexdigest()
    edit_json(run / "metrics.json", lambda m: m.update(best_weights_sha256=digest))


def users_run_like_folder(ws: Path) -> None:
    for name in ("best", "checkpoint"):
        (ws / "mine" / name).mkdir(parents=True)
        (ws / "mine" / name / "notes.txt").write_text("the user's own file\n")


def with_best_of(run: Path, other: Path) -> None:
    shutil.rmtree(run / "best")
    shutil.copytree(other / "best", run / "best")


def edited_split(data: Path, split: str) -> None:
    frame = pd.read_parquet(data / f"{split}.parquet")
    frame.loc[0, "text"] = "an edited sentence"
    frame.to_parquet(data / f"{split}.parquet")


def mutate(action: Callable[[Path], object], args: Callable[[Path], list[str]]) -> Case:
    """A case that first breaks something in the workspace, then runs a command."""

    def case(ws: Path) -> list[str]:
        action(ws)
        return args(ws)

    return case


def write_config(text: str | bytes) -> Case:
    def case(ws: Path) -> list[str]:
        (ws / "bad.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
        args = train_args(ws)
        args[args.index("--config") + 1] = f"{ws}/bad.yaml"
        return args

    return case


def paired_args(ws: Path, *extra: str) -> list[str]:
    return ["paired-table", "--metrics", f"{ws}/runs/base/metrics.json", "--out", f"{ws}/tables/paired", *extra]


LR = "training.learning_rate"
TINY_YAML = yaml.safe_dump(tiny_config())
# "billion laughs": 9 levels of 9 aliases, 342 bytes that stand for 9**9 (387 million) strings
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{inner}'] * 9)}]\n" for inner, name in zip("abcdefgh", "bcdefghi")
)
CATALOGUE: dict[str, tuple[Case, str]] = {
    # --- prepare: raw files and output paths
    "csv cut inside a quoted field": (
        mutate(
            lambda ws: (ws / "raw/ag_news/train.csv").write_text('"1","a title","a bo'),
            lambda ws: prepare_args(ws, "ag_news"),
        ),
        r"train.csv:1: malformed CSV \(unexpected end of data\)",
    ),
    "csv with a stray quote": (
        mutate(
            lambda ws: (ws / "raw/ag_news/test.csv").write_text('"1","a"b,"c"\n'),
            lambda ws: prepare_args(ws, "ag_news"),
        ),
        r"test.csv:1: malformed CSV",
    ),
    "prepare --out is an existing file": (
        lambda ws: prepare_args(ws, out="notes.txt"),
        r"notes.txt exists and is not a folder",
    ),
    "prepare --out inside a file": (
        lambda ws: prepare_args(ws, out="notes.txt/sst2"),
        r"notes.txt is a file, so --out",
    ),
    "prepare --out is a folder of the user's files": (
        lambda ws: prepare_args(ws, out="models"),
        r"models holds files but no manifest.json, so it is not an earlier output this command may replace",
    ),
    "prepare an unknown dataset": (
        lambda ws: [*prepare_args(ws)[:4], "imdb", *prepare_args(ws)[5:]],
        r"invalid choice: 'imdb'",
    ),
    # --- configuration
    "learning rate .inf in the config file": (
        write_config(yaml.safe_dump(tiny_config()).replace("learning_rate: 0.003", "learning_rate: .inf")),
        r"'training.learning_rate': NaN and infinity are not allowed",
    ),
    "learning rate .nan with --set": (
        lambda ws: train_args(ws, "--set", f"{LR}=.nan"),
        r"'training.learning_rate': NaN",
    ),
    "learning rate above its bound": (
        lambda ws: train_args(ws, "--set", f"{LR}=5"),
        r"learning_rate': 5 is greater than the maximum of 1",
    ),
    "huge FreeLB step": (
        lambda ws: train_args(ws, "--set", "datasets.sst2.freelb.adv_lr=1e30", method="freelb"),
        r"freelb.adv_lr': 1e\+30 is greater than the maximum",
    ),
    "config that is not YAML": (write_config("training: [\n"), r"bad.yaml is not valid YAML"),
    "config file missing": (
        lambda ws: [*train_args(ws)[:2], f"{ws}/none.yaml", *train_args(ws)[3:]],
        r"config file not found",
    ),
    "override without =": (lambda ws: train_args(ws, "--set", LR), r"is not KEY=VALUE"),
    "a second training block in the config file": (
        write_config(TINY_YAML + "training: {learning_rate: 0.5}\n"),
        r"bad.yaml is not valid YAML: line \d+: duplicate key 'training' \(first given on line \d+\); keep one",
    ),
    "a key given twice inside a section": (
        write_config(TINY_YAML.replace("  learning_rate: 0.003\n", "  learning_rate: 0.003\n  learning_rate: 0.5\n")),
        r"bad.yaml is not valid YAML: line \d+: duplicate key 'learning_rate'",
    ),
    "a YAML alias bomb": (
        write_config(ALIAS_BOMB),
        r"bad.yaml: the config expands to more than 100,000 values \(YAML aliases",
    ),
    "a recursive YAML alias": (
        write_config(TINY_YAML + "analysis: &loop {datasets: [*loop]}\n"),
        r"expands to more than 100,000 values .*recursive alias",
    ),
    "a duplicate key in a --set value": (
        lambda ws: train_args(ws, "--set", "model.overrides={hidden_size: 32, hidden_size: 64}"),
        r"the value is not valid YAML \(line 1: duplicate key 'hidden_size'",
    ),
    "a config file that is not UTF-8": (
        write_config(TINY_YAML.replace("run_name: t", "run_name: caf\xe9").encode("latin-1")),
        r"bad.yaml:\d+: not UTF-8 text \(byte \d+\); save the file as UTF-8",
    ),
    "run_name that climbs out of results/": (
        lambda ws: train_args(ws, "--set", "run_name=.."),
        r"config key 'run_name': '\.\.' is not allowed; .*one plain folder name",
    ),
    "run_name with a slash": (
        lambda ws: train_args(ws, "--set", "run_name=mine/../../x"),
        r"config key 'run_name': 'mine/\.\./\.\./x' is not allowed",
    ),
    "raw file outside the dataset's raw folder": (
        lambda ws: [*prepare_args(ws), "--set", "datasets.sst2.files.train=../../notes.txt"],
        r"config key 'datasets.sst2.files.train': '\.\./\.\./notes.txt' is not allowed; a file name in <raw_dir>/",
    ),
    "absolute raw file among the alternatives": (
        lambda ws: [*prepare_args(ws), "--set", f"datasets.sst2.files.train=[train.tsv, {ws}/notes.txt]"],
        r"config key 'datasets.sst2.files.train.1': '.*notes.txt' is not allowed",
    ),
    "max_steps of 1e29": (
        lambda ws: train_args(ws, "--set", "training.max_steps=1.0e+29"),
        r"'training.max_steps': 1e\+29 is greater than the maximum of 10000000",
    ),
    "an evaluation batch of a billion": (
        lambda ws: train_args(ws, "--set", "training.eval_batch_size=1000000000"),
        r"'training.eval_batch_size': 1000000000 is greater than the maximum of 65536",
    ),
    "CARL negatives beyond any dataset": (
        lambda ws: train_args(ws, "--set", "datasets.sst2.carl.negatives=100000000", method="carl"),
        r"'datasets.sst2.carl.negatives': 100000000 is greater than the maximum of 1000000",
    ),
    "an hpsearch grid of 17 values": (
        lambda ws: train_args(ws, "--set", f"hpsearch.grid.adv_steps=[{', '.join(map(str, range(1, 18)))}]"),
        r"'hpsearch.grid.adv_steps': .* is too long",
    ),
    "data.max_length above the model's positions": (
        lambda ws: train_args(ws, "--set", "data.max_length=1024"),
        r"config key 'data.max_length' is 1024, but model 'random:minilm-l6' has 512 positions "
        r"\(max_position_embeddings\); set data.max_length to at most 512",
    ),
    "train --device cuda:9": (
        lambda ws: [*train_args(ws), "--device", "cuda:9"],
        r"device 'cuda:9' (requested but (this torch is a CPU-only build|torch sees no GPU)|does not exist)",
    ),
    "train --device cuda:x": (lambda ws: [*train_args(ws), "--device", "cuda:x"], r"unknown device 'cuda:x'"),
    "unknown config key": (
        lambda ws: train_args(ws, "--set", "training.learning_rat=0.1"),
        r"'learning_rat' was unexpected",
    ),
    # --- train: command-line values and output
    "train --seed -1": (lambda ws: train_args(ws, seed="-1"), r"--seed: -1 must be >= 0"),
    "train --seed 2**32": (lambda ws: train_args(ws, seed=str(2**32)), r"must be <= 4294967295"),
    "train --seed not a number": (lambda ws: train_args(ws, seed="one"), r"'one' is not an integer"),
    "train --out is a file": (lambda ws: train_args(ws, out="notes.txt"), r"notes.txt exists and is not a folder"),
    "train --out is a folder of the user's files": (
        lambda ws: train_args(ws, out="models"),
        r"models holds files that no carlrar run wrote \(noweights, truncated\); give --out a new or empty folder",
    ),
    "train --restart on best/ and checkpoint/ of the user's": (
        mutate(users_run_like_folder, lambda ws: train_args(ws, "--restart", out="mine")),
        r"mine holds files that no carlrar run wrote \(best, checkpoint\)",
    ),
    "train --data of another dataset": (
        lambda ws: train_args(ws, data="data/ag_news"),
        r"holds the prepared ag_news data, not sst2",
    ),
    "finished run without its checkpoint or predictions": (
        mutate(
            lambda ws: [
                shutil.rmtree(ws / "runs/base/checkpoint"),
                (ws / "runs/base/eval_predictions.parquet").unlink(),
            ],
            lambda ws: train_args(ws, out="runs/base"),
        ),
        r"holds this run's metrics.json but neither its checkpoint nor all its results; rerun with --restart",
    ),
    # --- prepared data
    "manifest that is not JSON": (
        mutate(lambda ws: (ws / "data/sst2/manifest.json").write_text("{"), train_args),
        r"manifest.json is damaged \(Expecting",
    ),
    "manifest without splits": (
        mutate(lambda ws: edit_json(ws / "data/sst2/manifest.json", lambda m: m.pop("splits")), train_args),
        r"manifest.json is damaged \(splits.train lacks its rows and sha256\)",
    ),
    "manifest missing": (
        mutate(lambda ws: (ws / "data/sst2/manifest.json").unlink(), train_args),
        r"manifest.json not found: run 'carlrar prepare'",
    ),
    "parquet of garbage": (
        mutate(lambda ws: (ws / "data/sst2/train.parquet").write_bytes(b"garbage"), train_args),
        r"train.parquet is damaged or not a prepared split",
    ),
    "parquet with an edited row": (
        mutate(lambda ws: edited_split(ws / "data/sst2", "dev"), train_args),
        r"dev.parquet does not match its manifest",
    ),
    "parquet missing": (
        mutate(lambda ws: (ws / "data/sst2/test.parquet").unlink(), train_args),
        r"test.parquet not found; rerun 'carlrar prepare'",
    ),
    # --- the run folder's checkpoint and results
    "checkpoint of another learning rate": (
        lambda ws: train_args(ws, "--set", f"{LR}=0.001", out="runs/base"),
        r"holds another run: its checkpoint belongs to another run \(settings.training.learning_rate 0.003 -> 0.001\); "
        r"rerun with --restart",
    ),
    "checkpoint of another method": (
        lambda ws: train_args(ws, method="freelb", out="runs/base"),
        r"its checkpoint belongs to another run \(method base -> freelb",
    ),
    "checkpoint of another data sample": (
        lambda ws: train_args(ws, out="runs/base", data="data/sst2_other"),
        r"its checkpoint belongs to another run \(data_sha256.dev ",
    ),
    "checkpoint record damaged": (
        mutate(lambda ws: truncate(ws / "runs/base/checkpoint/state.json"), lambda ws: train_args(ws, out="runs/base")),
        r"the checkpoint .*state.json is unreadable .*--restart",
    ),
    "checkpoint weights truncated": (
        mutate(
            lambda ws: truncate(ws / "runs/base/checkpoint/state.safetensors"),
            lambda ws: train_args(ws, out="runs/base"),
        ),
        r"the checkpoint .*checkpoint is unreadable .*--restart",
    ),
    "checkpoint of an incompatible format": (
        mutate(
            lambda ws: edit_json(ws / "runs/base/checkpoint/state.json", lambda s: s.update(format=2)),
            lambda ws: train_args(ws, out="runs/base"),
        ),
        r"incompatible version of carlrar \(format 2",
    ),
    "checkpoint from before run identities": (
        mutate(
            lambda ws: edit_json(ws / "runs/base/checkpoint/state.json", lambda s: s.pop("run_identity")),
            lambda ws: train_args(ws, out="runs/base"),
        ),
        r"earlier carlrar that recorded no run identity",
    ),
    "finished run of another configuration without checkpoint": (
        mutate(
            lambda ws: shutil.rmtree(ws / "runs/base/checkpoint"),
            lambda ws: train_args(ws, "--set", f"{LR}=0.001", out="runs/base"),
        ),
        r"its metrics.json belongs to another run \(settings.training.learning_rate",
    ),
    # --- models and warm-ups
    "model folder without weights": (
        lambda ws: train_args(ws, "--set", f"model.name={ws}/models/noweights", "--set", "model.overrides={}"),
        r"does not hold a loadable checkpoint",
    ),
    "model folder with truncated weights": (
        lambda ws: train_args(ws, "--set", f"model.name={ws}/models/truncated", "--set", "model.overrides={}"),
        r"does not hold a loadable checkpoint \(Error while deserializing header",
    ),
    "warm-up folder that holds none": (
        lambda ws: train_args(ws, "--set", "training.rar.warmup_steps=5", "--rar-warmup", f"{ws}/empty", method="rar"),
        r"holds no reconstructor warm-up",
    ),
    "rar-warmup --out is a file": (
        lambda ws: [
            "rar-warmup",
            "--config",
            f"{ws}/config.yaml",
            "--dataset",
            "sst2",
            "--data",
            f"{ws}/data/sst2",
            "--out",
            f"{ws}/notes.txt",
        ],
        r"notes.txt exists and is not a folder",
    ),
    # --- attack
    "attack --steps 0": (
        lambda ws: attack_args(ws, "--steps", "0"),
        r"--steps: 0 must be >= 1 \(as config key analysis.steps\)",
    ),
    "attack --epsilons -0.1": (lambda ws: attack_args(ws, "--epsilons", "-0.1"), r"--epsilons: -0.1 must be >= 0"),
    "attack --epsilons nan": (
        lambda ws: attack_args(ws, "--epsilons", "nan"),
        r"--epsilons: nan is not a finite number",
    ),
    "attack --batch-size 0": (lambda ws: attack_args(ws, "--batch-size", "0"), r"--batch-size: 0 must be >= 1"),
    "attack --steps 10**11": (
        lambda ws: attack_args(ws, "--steps", "100000000000"),
        r"--steps: 100000000000 must be <= 1000 \(as config key analysis.steps\)",
    ),
    "attack --batch-size 10**9": (
        lambda ws: attack_args(ws, "--batch-size", "1000000000"),
        r"--batch-size: 1000000000 must be <= 65536",
    ),
    "attack --epsilons with 33 radii": (
        lambda ws: attack_args(ws, "--epsilons", *[f"0.0{i:02d}" for i in range(33)]),
        r"--epsilons: 33 values, at most 32 allowed \(as config key analysis.epsilons\)",
    ),
    "attack --device cuda:9": (
        lambda ws: attack_args(ws, "--device", "cuda:9"),
        r"device 'cuda:9' (requested but|does not exist)",
    ),
    "attack --config with a million PGD steps": (
        mutate(
            lambda ws: (ws / "bad.yaml").write_text(yaml.safe_dump({**tiny_config(), "analysis": {"steps": 10**6}})),
            lambda ws: attack_args(ws, "--config", f"{ws}/bad.yaml"),
        ),
        r"bad.yaml: config key 'analysis.steps': 1000000 is greater than the maximum of 1000",
    ),
    "paired-table --resamples 10**9": (
        lambda ws: paired_args(ws, "--resamples", "1000000000"),
        r"--resamples: 1000000000 must be <= 1000000",
    ),
    "attack --step-size-ratio 0": (
        lambda ws: attack_args(ws, "--step-size-ratio", "0"),
        r"--step-size-ratio: 0 must be > 0",
    ),
    "attack --config missing": (
        lambda ws: attack_args(ws, "--config", f"{ws}/none.yaml"),
        r"config file not found: .*none.yaml",
    ),
    "attack --config with analysis.steps 0": (
        mutate(
            lambda ws: (ws / "bad.yaml").write_text(yaml.safe_dump({**tiny_config(), "analysis": {"steps": 0}})),
            lambda ws: attack_args(ws, "--config", f"{ws}/bad.yaml"),
        ),
        r"bad.yaml: config key 'analysis.steps': 0 is less than the minimum of 1",
    ),
    "samples --config with an unknown analysis key": (
        mutate(
            lambda ws: (ws / "bad.yaml").write_text(yaml.safe_dump({**tiny_config(), "analysis": {"epsilon": 0.1}})),
            lambda ws: samples_args(ws, "--config", f"{ws}/bad.yaml"),
        ),
        r"config key 'analysis': .*'epsilon' was unexpected.*known keys: batch_size, datasets, epsilons",
    ),
    "attack truncated best weights": (
        mutate(lambda ws: truncate(ws / "runs/base/best/weights.safetensors"), attack_args),
        r"weights.safetensors is not the weights the run's metrics.json describes .*train the run again",
    ),
    "attack NaN best weights": (
        mutate(lambda ws: with_nan_weight(ws / "runs/base"), attack_args),
        r"holds non-finite weights \(1 tensors, e.g. model.classifier.weight\)",
    ),
    "attack on another data sample": (
        lambda ws: attack_args(ws, data="data/sst2_other"),
        r"was evaluated on another dev sample than .*sst2_other holds",
    ),
    "attack something that is not a run": (lambda ws: attack_args(ws, run="data"), r"is not a finished training run"),
    "attack a run with a damaged metrics.json": (
        mutate(lambda ws: (ws / "runs/base/metrics.json").write_text("{"), attack_args),
        r"metrics.json is not valid JSON: .*; train the run again",
    ),
    "attack a run whose best/ lost its config": (
        mutate(lambda ws: (ws / "runs/base/best/config.json").unlink(), attack_args),
        r"best lacks config.json \(the architecture of its weights\); train the run again",
    ),
    "attack --out is a file": (
        lambda ws: [*attack_args(ws)[:6], f"{ws}/notes.txt", *attack_args(ws)[7:]],
        r"notes.txt exists and is not a folder",
    ),
    "attack a run whose best/ holds another run's model": (
        mutate(lambda ws: with_best_of(ws / "runs/base", ws / "runs/ag_news"), attack_args),
        r"best/weights.safetensors is not the weights the run's metrics.json describes",
    ),
    "attack a run whose metrics.json lost its data hashes": (
        mutate(
            lambda ws: edit_json(ws / "runs/base/metrics.json", lambda m: m.pop("data")),
            lambda ws: attack_args(ws, data="data/sst2_other"),
        ),
        r"was evaluated on another dev sample",
    ),
    "attack --out inside the run folder": (
        lambda ws: [*attack_args(ws)[:6], f"{ws}/runs/base/attack", *attack_args(ws)[7:]],
        r"runs/base/attack is inside a training run's folder; give it a path of its own",
    ),
    "attack --out is a folder of the user's files": (
        lambda ws: [*attack_args(ws)[:6], f"{ws}/models", *attack_args(ws)[7:]],
        r"models holds files but no summary.json",
    ),
    # --- samples
    "samples --out onto a run's metrics.json": (
        lambda ws: samples_args(ws, out="runs/base/metrics.json"),
        r"runs/base/metrics.json is inside a training run's folder; give it a path of its own",
    ),
    "samples --epsilon 0": (lambda ws: samples_args(ws, "--epsilon", "0"), r"--epsilon: 0 must be > 0"),
    "samples from a run without reconstructor": (lambda ws: samples_args(ws, run="runs/base"), r"has no reconstructor"),
    "samples --out is a folder": (
        lambda ws: samples_args(ws, out="empty"),
        r"empty is a folder; give --out a file path",
    ),
    "samples on another data sample": (
        lambda ws: samples_args(ws, data="data/sst2_other"),
        r"evaluated on another dev sample",
    ),
}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root``, hidden ones included, with the bytes of each file (None for folders)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    ws: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    build, pattern = CATALOGUE[name]
    argv = build(ws)
    before = snapshot(ws)
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.match(r"carlrar( \S+)?: error: ", err), err
    assert re.search(pattern, err), err
    assert snapshot(ws) == before, "a refused command changed the workspace"


def test_the_catalogue_is_large_and_every_case_names_its_problem() -> None:
    assert len(CATALOGUE) >= 50
    assert len({pattern for _, pattern in CATALOGUE.values()}) > 40


def test_a_diverging_run_stops_in_one_line_keeping_its_last_good_checkpoint(
    ws: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """lr .inf can no longer be configured, so the divergence is injected: the loss of step 4 turns NaN."""
    real_step, calls = training.adversarial_backward, {"n": 0}

    def nan_at_step_four(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            out.losses["ce"] = float("inf") * 0
        return out

    monkeypatch.setattr(training, "adversarial_backward", nan_at_step_four)
    code, err = run_cli(train_args(ws, "--set", "training.epochs=2"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"training diverged at step 4 \(epoch 1, batch 4\): loss nan \(ce nan\)", err), err
    assert "last good checkpoint (step 2)" in err and "--restart" in err
    run = ws / "runs/new"
    assert json.loads((run / "checkpoint/state.json").read_text())["progress"]["step"] == 2
    assert not (run / "metrics.json").exists() and not (run / "best").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert all(torch.isfinite(v).all() for v in load_file(str(run / "checkpoint/state.safetensors")).values())


def test_a_second_process_on_a_run_folder_is_refused_naming_the_holder(
    ws: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real second process holds the folder's lock (as a running `carlrar train` does); train refuses at once."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(ws / "runs/new")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(ws)
        code, err = run_cli(train_args(ws), capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert re.search(rf"runs/new is in use by \S+ pid {holder.pid} .*wait for it to finish", err), err
        assert snapshot(ws) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(train_args(ws)) == 0  # the OS dropped the killed holder's lock


HOLD_LOCK = """
import sys, time
from carlrar.storage import exclusive
with exclusive(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _inject_loss(monkeypatch: pytest.MonkeyPatch, at_call: int, term: str) -> None:
    """The loss term ``term`` of the ``at_call``-th training step turns infinite (a divergence, injected)."""
    real_step, calls = training.adversarial_backward, {"n": 0}

    def diverging(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at_call:
            out.losses[term] = float("inf")
        return out

    monkeypatch.setattr(training, "adversarial_backward", diverging)


@pytest.mark.parametrize(
    ("term", "advice"), [("carl", r"raise training.carl.temperature"), ("ce", r"lower training.learning_rate")]
)
def test_the_divergence_advice_names_the_setting_of_the_loss_that_diverged(
    ws: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], term: str, advice: str
) -> None:
    """CARL's L_D overflows at a small temperature while cross-entropy stays finite: the learning rate is then the
    wrong thing to lower."""
    _inject_loss(monkeypatch, 3, term)
    code, err = run_cli(train_args(ws, method="carl"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(rf"training diverged at step 3 .*{term} inf.*[;:] {advice}", err), err
    assert ("temperature" in err) == (term == "carl"), err


def _no_files_but_the_workspace(ws: Path, before: dict[str, bytes | None], run: Path) -> None:
    """Nothing of the workspace changed; the new run folder holds no file (no half-written or hidden entry)."""
    inside = str(run.relative_to(ws))
    assert {k: v for k, v in snapshot(ws).items() if not k.startswith(inside)} == before
    assert not [p for p in run.rglob("*") if p.is_file() and p.name != OWNER_FILE]  # the run's mark may stay


def test_disk_full_while_replacing_prepared_data_keeps_the_old_copy(
    ws: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data.pq, "write_table", full)
    before = snapshot(ws)
    code, err = run_cli(prepare_args(ws, out="data/sst2"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"no space left on device writing \S+/data/sst2; free space or point --out elsewhere", err), err
    assert snapshot(ws) == before


def test_disk_full_while_checkpointing_leaves_no_half_written_checkpoint(
    ws: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """safetensors reports a full disk in its own exception type, with the OS error in its text."""

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoints, "save_file", full)
    before = snapshot(ws)
    code, err = run_cli(train_args(ws), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"no space left on device writing \S+/runs/new/checkpoint; free space", err), err
    _no_files_but_the_workspace(ws, before, ws / "runs/new")


def test_a_file_size_limit_is_one_line_naming_it_and_keeps_the_old_copy(ws: Path) -> None:
    """A real ``ulimit -f``: the kernel refuses the write (EFBIG; Python ignores SIGXFSZ) part-way through a split."""
    limit = 1024  # bytes: less than one prepared split, more than the command needs to start

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = snapshot(ws)
    result = subprocess.run(
        [sys.executable, "-m", "carlrar.cli", "-q", *prepare_args(ws, out="data/sst2")],
        preexec_fn=limited,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.search(r"file size limit exceeded \(ulimit -f\) writing \S+/data/sst2; raise the limit", result.stderr)
    assert snapshot(ws) == before
