"""RAR's reconstructor warm-up, for backbones that ship no pretrained masked-LM head (MiniLM, BERT checkpoints
without one): the head alone is trained on clean training sentences, encoder frozen, before the rar / carl_rar
runs start from it. One warm-up per (dataset, model), shared by every seed; a folder made for other data or
settings is refused.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from carlrar.adversary import (
    Batch,
    amp_dtype_for,
    autocast_context,
    precision_record,
)
from carlrar.batching import EncodedSplit, batches, encode_split, epoch_order
from carlrar.config import Config
from carlrar.devices import leased_device
from carlrar.errors import CarlrarError, TrainingDiverged, first_line
from carlrar.fingerprints import code_fingerprint
from carlrar.identity import (
    library_versions,
)
from carlrar.methods import Method
from carlrar.models import TextClassifier, load_model
from carlrar.prepared import read_manifest, read_split
from carlrar.reconstruction import (
    build_reconstructor,
    head_state,
    load_head_state,
    token_accuracy,
    warm_up,
)
from carlrar.registry import RECONSTRUCTION_METHODS
from carlrar.storage import atomic_dir, check_output_dir, exclusive, sha256_file, write_json

log = logging.getLogger(__name__)


WARMUP_ENTRY = "rar_warmup.py"  # the module `carlrar rar-warmup` runs: its imports are the warm-up's code
WARMUP_HEAD_FILE = "reconstructor.safetensors"
WARMUP_RECORD_FILE = "warmup.json"


def _warmup_identity(config: Config, manifest: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the warmed-up head: a run refuses a warm-up made from anything else."""
    return {
        "model": config.model["name"],
        "overrides": config.model.get("overrides") or {},
        "max_length": config.data.max_length,
        "warmup": config.rar.warmup_settings(),
        "data": {split: manifest["splits"][split]["sha256"] for split in ("train", "dev")},
        "precision": config.training["precision"],
        "code": code_fingerprint(WARMUP_ENTRY),
    }


def _warmup_batches(split: EncodedSplit, steps: int, batch_size: int, seed: int, pad_id: int) -> Iterator[Batch]:
    """``steps`` batches of shuffled training sentences, reshuffled (seeded) at each pass over the split."""
    produced, epoch = 0, 0
    while produced < steps:
        for batch in batches(split, epoch_order(len(split), seed, epoch), batch_size, pad_id):
            if produced == steps:
                return
            produced += 1
            yield batch
        epoch += 1


def warm_up_reconstructor(
    config: Config, dataset: str, data_dir: str | Path, out_dir: str | Path, device_request: str = "auto"
) -> dict[str, Any]:
    """Fit RAR's head on clean training inputs with the pretrained encoder frozen; write it to ``out_dir``.

    Run once per (dataset, model): every rar / carl_rar seed starts from this head (``train(rar_warmup=...)``).
    Writes ``reconstructor.safetensors`` and ``warmup.json`` (clean-dev token reconstruction accuracy before
    and after, the loss curve, and the identity a run checks before using it), atomically.
    """
    check_output_dir(out_dir, replaces=WARMUP_RECORD_FILE)
    with exclusive(out_dir):  # one process per output folder; a second names the holder
        return _warm_up(config, dataset, data_dir, out_dir, device_request)


def _warm_up(
    config: Config, dataset: str, data_dir: str | Path, out_dir: str | Path, device_request: str = "auto"
) -> dict[str, Any]:
    """warm_up_reconstructor() once it holds ``out_dir``."""
    from transformers import set_seed

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    manifest, rar = read_manifest(data_dir), config.rar
    with leased_device(device_request) as device:
        set_seed(rar.warmup_seed, deterministic=device.type == "cpu")
        model, tokenizer = load_model(
            config.model["name"],
            manifest["num_labels"],
            config.model.get("overrides") or None,
            "cls",
            config.data.max_length,
        )
        reconstructor = build_reconstructor(model, config.model["name"])
        model.to(device)
        reconstructor.to(device)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        train_split = encode_split(read_split(data_dir, "train", manifest), tokenizer, config.data.max_length)
        dev_split = encode_split(read_split(data_dir, "dev", manifest), tokenizer, config.data.max_length)

        amp_dtype = amp_dtype_for(config.training["precision"], device)

        def dev_accuracy() -> float:
            dev = batches(dev_split, torch.arange(len(dev_split)), config.training["eval_batch_size"], pad_id)
            with autocast_context(device, amp_dtype):
                return token_accuracy(model, reconstructor, (b.to(device) for b in dev))

        started, before = time.perf_counter(), dev_accuracy()
        steps = _warmup_batches(train_split, rar.warmup_steps, rar.warmup_batch_size, rar.warmup_seed, pad_id)
        bar = tqdm(steps, total=rar.warmup_steps, desc=f"{dataset}/rar-warmup", unit="step", dynamic_ncols=True)
        losses = warm_up(model, reconstructor, (b.to(device) for b in bar), rar.warmup_learning_rate, amp_dtype)
        bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
        if bad is not None:
            raise TrainingDiverged(
                f"the reconstructor warm-up diverged at step {bad + 1} (loss {losses[bad]}); nothing was written; "
                "lower training.rar.warmup_learning_rate"
            )
        after = dev_accuracy()
    record = {
        "dataset": dataset,
        "identity": _warmup_identity(config, manifest),
        "dev_token_accuracy_before": before,
        "dev_token_accuracy_after": after,
        "losses": losses,
        "seconds": time.perf_counter() - started,
        "device": str(device),
        "precision": precision_record(config.training["precision"], amp_dtype),
        "versions": library_versions(),
    }
    with atomic_dir(out_dir) as tmp:
        save_file(head_state(reconstructor), str(tmp / WARMUP_HEAD_FILE))
        write_json(tmp / WARMUP_RECORD_FILE, record)
    log.info("%s: reconstructor warm-up, clean dev token accuracy %.4f -> %.4f", dataset, before, after)
    return record


def _read_warmup(warmup_dir: Path, config: Config, manifest: dict[str, Any]) -> dict:
    """The record of a warm-up made for exactly this model, data and warm-up setting; else one clear error."""
    record_path, head_path = warmup_dir / WARMUP_RECORD_FILE, warmup_dir / WARMUP_HEAD_FILE
    if not record_path.is_file() or not head_path.is_file():
        raise CarlrarError(
            f"{warmup_dir} holds no reconstructor warm-up ({WARMUP_RECORD_FILE} and {WARMUP_HEAD_FILE}); "
            "run carlrar rar-warmup"
        )
    try:
        record = json.loads(record_path.read_text())
        recorded = record.get("identity", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise CarlrarError(f"{record_path} is unreadable ({first_line(exc)}); rerun carlrar rar-warmup") from None
    expected = _warmup_identity(config, manifest)
    differing = sorted(key for key in expected if recorded.get(key) != expected[key])
    if differing:
        raise CarlrarError(
            f"the reconstructor warm-up in {warmup_dir} was made with other {', '.join(differing)} than this run; "
            "rerun carlrar rar-warmup with this config and data"
        )
    return record


def warmup_fits(warmup_dir: Path, config: Config, manifest: dict[str, Any]) -> bool:
    """Whether a run's own warm-up folder holds a warm-up of this config and data (else it is made again)."""
    try:
        _read_warmup(warmup_dir, config, manifest)
    except CarlrarError:
        return False
    return True


def warmup_source(method: str, config: Config, manifest: dict[str, Any], rar_warmup: str | Path | None) -> str | None:
    """What a run's reconstructor starts from, for its identity: a shared warm-up's head hash, "own" or None.

    A shared warm-up is checked here, before the run folder is touched, so a wrong one is refused up front.
    """
    if method not in RECONSTRUCTION_METHODS or not config.rar.warmup_steps:
        return None
    if rar_warmup is None:
        return "own"
    _read_warmup(Path(rar_warmup), config, manifest)
    return sha256_file(Path(rar_warmup) / WARMUP_HEAD_FILE)


def _load_warmup(reconstructor: nn.Module, warmup_dir: Path, config: Config, manifest: dict[str, Any]) -> dict:
    """Start RAR's head from a warm-up made for exactly this model, data and warm-up setting."""
    record = _read_warmup(warmup_dir, config, manifest)
    try:
        load_head_state(reconstructor, load_file(str(warmup_dir / WARMUP_HEAD_FILE)))
    except Exception as exc:  # a damaged or foreign head: safetensors and load_state_dict fail alike
        raise CarlrarError(
            f"{warmup_dir / WARMUP_HEAD_FILE} is unreadable ({first_line(exc)}); rerun carlrar rar-warmup"
        ) from None
    return record


def start_reconstructor(
    method: Method,
    model: TextClassifier,
    config: Config,
    manifest: dict[str, Any],
    rar_warmup: Path | None,
    dev_batches: Callable[[], Iterator[Batch]],
) -> dict[str, float]:
    """Load the warmed-up head into a RAR method; return clean-dev token accuracy before and after the warm-up.

    Without a warm-up (``warmup_steps`` 0: a pretrained MLM head) both are the head's accuracy as the run starts.
    """
    if "rar" not in method.modules:
        return {}
    objective = method.modules["rar"]
    if config.rar.warmup_steps:
        record = _load_warmup(objective.reconstructor, rar_warmup, config, manifest)
        return {
            "before_warmup": record["dev_token_accuracy_before"],
            "after_warmup": record["dev_token_accuracy_after"],
        }
    start = token_accuracy(model, objective.reconstructor, dev_batches())
    return {"before_warmup": start, "after_warmup": start}
