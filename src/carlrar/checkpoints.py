"""What a run leaves on disk and reads back: the resumable checkpoint (modules, optimizer, scheduler, RNG states,
position in the epoch) written atomically, and a finished run's best weights, rebuilt for evaluation and attacks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from carlrar.errors import CarlrarError, first_line
from carlrar.identity import (
    RESTART_ADVICE,
    fingerprint,
)
from carlrar.models import TextClassifier, load_model
from carlrar.reconstruction import (
    build_reconstructor,
)
from carlrar.storage import atomic_dir, atomic_path, read_json, sha256_file

log = logging.getLogger(__name__)


def _flatten(prefix: str, obj: Any, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Split a nested state into safetensors-storable tensors and JSON-storable values (no pickle).

    Nesting levels are joined with "/", which never occurs in state_dict keys (those use ".").
    """
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(f"{prefix}/{key}" if prefix else str(key), value, tensors, meta)
    else:
        meta[prefix] = obj


def _unflatten(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for key, value in [*tensors.items(), *meta.items()]:
        node = root
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return root


def rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def module_state(module: nn.Module) -> dict[str, Any]:
    """state_dict with tied parameters once (safetensors refuses shared storage) and extra states nested."""
    return {key: value.clone() if isinstance(value, Tensor) else value for key, value in module.state_dict().items()}


@dataclass
class Progress:
    """Everything about where training stands that is not a tensor."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_dev_accuracy: float = -1.0
    best_step: int = -1
    train_seconds: float = 0.0
    samples_seen: int = 0
    recent_losses: list[float] = field(default_factory=list)  # the logged running loss, restored on resume
    history: list[dict[str, Any]] = field(default_factory=list)


CHECKPOINT_FORMAT = 3  # bump when the layout of state.json / state.safetensors changes (3: the run identity)


def save_checkpoint(path: Path, state: dict[str, Any], progress: Progress, identity: dict[str, Any]) -> None:
    """Write the resumable state with the identity of the run it belongs to (see carlrar.identity)."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    _flatten("", state, tensors, meta)
    record = {
        "format": CHECKPOINT_FORMAT,
        "run_fingerprint": fingerprint(identity),
        "run_identity": identity,
        "meta": meta,
        "progress": progress.__dict__,
    }
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(record, indent=1))


def load_checkpoint(path: Path) -> tuple[dict[str, Any], Progress]:
    """Read a checkpoint; an unreadable or foreign one is one CarlrarError that says how to start over."""
    try:
        info = json.loads((path / "state.json").read_text())
        if info.get("format") != CHECKPOINT_FORMAT:
            raise CarlrarError(
                f"{path} was written by an incompatible version of carlrar (format {info.get('format')}, this "
                f"version reads {CHECKPOINT_FORMAT}); {RESTART_ADVICE}"
            )
        return _unflatten(load_file(str(path / "state.safetensors")), info["meta"]), Progress(**info["progress"])
    except CarlrarError:
        raise
    except Exception as exc:  # a damaged file fails in json, safetensors or Progress alike: one remedy for all
        raise CarlrarError(f"the checkpoint {path} is unreadable ({first_line(exc)}); {RESTART_ADVICE}") from None


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    groups = [dict(g) for g in json.loads(state["param_groups"])]
    per_param = {int(k): v for k, v in state.get("state", {}).items()}
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    sd = optimizer.state_dict()
    return {"state": {str(k): v for k, v in sd["state"].items()}, "param_groups": json.dumps(sd["param_groups"])}


def write_predictions(path: Path, gold: Tensor, predictions: Tensor) -> None:
    """Per-example outcome on the evaluated split: ``row`` (position in the split), ``gold``, ``pred``."""
    frame = pd.DataFrame({"row": range(len(gold)), "gold": gold.numpy(), "pred": predictions.numpy()})
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


@dataclass
class TrainedRun:
    """A finished run's best weights, rebuilt for evaluation and attacks."""

    model: TextClassifier
    tokenizer: PreTrainedTokenizerBase
    reconstructor: nn.Module | None
    metrics: dict[str, Any]


RETRAIN_ADVICE = "train the run again (carlrar train ... --restart)"


def read_best_weights(path: Path) -> dict[str, Tensor]:
    """A run's best weights, refused when the file is damaged or holds NaN / infinite values."""
    try:
        weights = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
        raise CarlrarError(f"{path} is unreadable ({first_line(exc)}); {RETRAIN_ADVICE}") from None
    broken = [name for name, value in weights.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise CarlrarError(
            f"{path} holds non-finite weights ({len(broken)} tensors, e.g. {broken[0]}): the run diverged; "
            f"{RETRAIN_ADVICE} with a lower learning rate"
        )
    if "model.classifier.weight" not in weights:
        raise CarlrarError(f"{path} holds no classifier (model.classifier.weight); {RETRAIN_ADVICE}")
    return weights


def _check_best_is_the_runs(weights_path: Path, metrics: Any) -> None:
    """Refuse weights other than those the run's metrics.json describes (a replaced or edited best/)."""
    recorded = metrics.get("best_weights_sha256") if isinstance(metrics, dict) else None
    if recorded is None:
        log.warning("%s records no hash of its best weights: cannot check they are the run's", weights_path.parent)
    elif sha256_file(weights_path) != recorded:
        raise CarlrarError(
            f"{weights_path} is not the weights the run's metrics.json describes (its sha256 differs): best/ was "
            f"replaced or changed after training; {RETRAIN_ADVICE}"
        )


def load_trained_run(run_dir: str | Path, device: torch.device | str = "cpu") -> TrainedRun:
    """Rebuild the model (and RAR's reconstructor, if the run has one) from ``run_dir/best`` in eval mode.

    The architecture and tokenizer come from the folder itself, so no hub access is needed.
    """
    run_dir = Path(run_dir)
    best, metrics_path = run_dir / "best", run_dir / "metrics.json"
    if not (best / "weights.safetensors").is_file() or not metrics_path.is_file():
        raise CarlrarError(f"{run_dir} is not a finished training run (no best/weights.safetensors or metrics.json)")
    if not (best / "config.json").is_file():
        raise CarlrarError(f"{best} lacks config.json (the architecture of its weights); {RETRAIN_ADVICE}")
    try:
        metrics = read_json(metrics_path, "the run's metrics.json")
    except CarlrarError as exc:
        raise CarlrarError(f"{exc}; {RETRAIN_ADVICE}") from None
    _check_best_is_the_runs(best / "weights.safetensors", metrics)
    weights = read_best_weights(best / "weights.safetensors")
    try:
        pooling = metrics["config"]["model"].get("pooling", "pooler")
    except (KeyError, TypeError, AttributeError):
        raise CarlrarError(
            f"{metrics_path} is not a carlrar metrics file (no config.model); {RETRAIN_ADVICE}"
        ) from None
    model, tokenizer = load_model(f"random:{best}", weights["model.classifier.weight"].shape[0], pooling=pooling)
    reconstructor = None
    rar_weights = {k.removeprefix("rar.reconstructor."): v for k, v in weights.items() if k.startswith("rar.")}
    try:
        model.load_state_dict({k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")})
        if rar_weights:
            reconstructor = build_reconstructor(model, f"random:{best}")
            reconstructor.load_state_dict(rar_weights)
            reconstructor.to(device).eval()
    except RuntimeError as exc:  # weights of another architecture than best/config.json describes
        raise CarlrarError(
            f"{best}: the weights do not fit its config.json ({first_line(exc)}); {RETRAIN_ADVICE}"
        ) from None
    model.to(device).eval()
    return TrainedRun(model, tokenizer, reconstructor, metrics)
