"""The training loop behind ``carlrar train``: readable, resumable, and reproducible on CPU bit for bit.

Shape after Hugging Face's ``run_glue_no_trainer.py``: tokenise once, AdamW with a linear schedule, gradient
clipping, dynamic padding, bf16 autocast on CUDA. Dev accuracy is evaluated every ``eval_every`` steps and at
each epoch end; the best weights are kept and evaluated on the test split. A resumable checkpoint (model,
optimizer, scheduler, RNG states, memory banks, position in the epoch) is written atomically, so a killed run
restarted with the same command continues where it stopped and ends with the same metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from carlrar import __version__
from carlrar.adversary import (
    AuxiliaryLoss,
    Batch,
    FreeLB,
    adversarial_backward,
    amp_dtype_for,
    autocast_context,
    parameters_of,
)
from carlrar.config import Config
from carlrar.contrastive import CARLLoss, CARLObjective
from carlrar.data import SPLITS, read_manifest, read_split
from carlrar.devices import select_device
from carlrar.distributed import Collective, init_collective
from carlrar.errors import CarlrarError, first_line
from carlrar.identity import (
    PREDICTIONS_FILE,
    RESTART_ADVICE,
    Restart,
    fingerprint,
    prepare_run_folder,
    run_identity,
)
from carlrar.models import TextClassifier, count_parameters, load_model
from carlrar.reconstruction import (
    RARObjective,
    build_reconstructor,
    head_state,
    load_head_state,
    token_accuracy,
    warm_up,
)
from carlrar.registry import METHOD_IDS as METHODS
from carlrar.storage import atomic_dir, atomic_path, check_output_dir, read_json, sha256_file, write_json

log = logging.getLogger(__name__)


# --- data -----------------------------------------------------------------------------------------------------


@dataclass
class EncodedSplit:
    """A tokenised split: one id list per example (unpadded) and the labels."""

    ids: list[list[int]]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.ids)


def encode_split(frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, max_length: int) -> EncodedSplit:
    """Tokenise a split read (and verified) by carlrar.data.read_split."""
    ids = tokenizer(list(frame["text"]), truncation=True, max_length=max_length)["input_ids"] if len(frame) else []
    return EncodedSplit(ids=ids, labels=torch.tensor(frame["label"].to_numpy(), dtype=torch.long))


def collate(split: EncodedSplit, rows: Tensor, pad_id: int) -> Batch:
    """Pad to the longest sequence in the batch (dynamic padding, SPEC 3 step 1)."""
    seqs = [split.ids[i] for i in rows.tolist()]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return Batch(input_ids=input_ids, attention_mask=mask, labels=split.labels[rows], indices=rows.clone())


def epoch_order(num_rows: int, seed: int, epoch: int) -> Tensor:
    """The shuffle of an epoch depends only on (seed, epoch), so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator)


def batches(
    split: EncodedSplit,
    order: Tensor,
    batch_size: int,
    pad_id: int,
    start: int = 0,
    collective: Collective | None = None,
) -> Iterator[Batch]:
    """Batches of ``order`` from batch number ``start``; with several ranks, each yields its share of each batch."""
    rank, world = (collective.rank, collective.world_size) if collective else (0, 1)
    for first in range(start * batch_size, len(order), batch_size):
        rows = order[first : first + batch_size]
        if len(rows) < world:  # too few rows to give every rank one: dropped, as steps_per_epoch assumes
            return
        yield collate(split, rows.tensor_split(world)[rank], pad_id)


def steps_in_epoch(num_rows: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch; a last batch too small to give every rank a row is dropped."""
    full, rest = divmod(num_rows, batch_size)
    return full + (1 if rest >= world_size else 0)


@torch.no_grad()
def evaluate(
    model: TextClassifier,
    split: EncodedSplit,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, Tensor]:
    """Accuracy and predictions on a split, in eval mode."""
    was_training = model.training
    model.eval()
    predictions = []
    for batch in batches(split, torch.arange(len(split)), batch_size, pad_id):
        batch = batch.to(device)
        with autocast_context(device, amp_dtype):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        predictions.append(logits.argmax(-1).cpu())
    model.train(was_training)
    preds = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
    accuracy = float((preds == split.labels).float().mean()) if len(split) else float("nan")
    return accuracy, preds


# --- the method --------------------------------------------------------------------------------------------

RAR_METHODS = ("rar", "carl_rar")  # the methods with RAR's reconstructor


@dataclass
class Method:
    """A method is a perturber plus auxiliary losses (SPEC 6 and 8)."""

    name: str
    freelb: FreeLB | None
    auxiliaries: list[AuxiliaryLoss]

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {aux.name: aux for aux in self.auxiliaries if isinstance(aux, nn.Module)}


def carl_schedule(start_step: int | None, start_epoch: float | None, steps_per_epoch: int) -> tuple[int, int]:
    """(tau, first bank-writing step): banks are written from the start of the epoch before tau's epoch.

    Starting at an epoch boundary guarantees every row is written before L_D starts (SPEC 4).
    """
    tau = start_step if start_step is not None else round((start_epoch or 0) * steps_per_epoch)
    if tau < steps_per_epoch:
        raise CarlrarError(
            f"CARL's start (tau = {tau} steps) must be at least one epoch ({steps_per_epoch} steps) so that the memory "
            "banks hold every training example when L_D starts; raise datasets.<name>.carl.start_step/start_epoch"
        )
    return tau, (tau // steps_per_epoch - 1) * steps_per_epoch


def build_method(
    name: str,
    config: Config,
    dataset: str,
    model: TextClassifier,
    train_labels: Tensor,
    seed: int,
    steps_per_epoch: int,
    collective: Collective | None = None,
) -> Method:
    if name not in METHODS:
        raise CarlrarError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    ds = config.dataset(dataset)
    freelb = None if name == "base" else FreeLB(ds.freelb)
    auxiliaries: list[AuxiliaryLoss] = []
    if name in ("carl", "carl_rar"):
        tau, bank_start = carl_schedule(ds.carl.start_step, ds.carl.start_epoch, steps_per_epoch)
        carl = config.training["carl"]
        try:
            loss = CARLLoss(
                train_labels,
                model.config.hidden_size,
                ds.carl.negatives,
                temperature=carl["temperature"],
                momentum=carl["momentum"],
                loss=carl["loss"],
                seed=seed,
                collective=collective,
            )
        except ValueError as exc:
            raise CarlrarError(f"CARL on {dataset}: {exc}") from None
        auxiliaries.append(CARLObjective(loss, start_step=tau, bank_start_step=bank_start))
    if name in RAR_METHODS:
        reconstructor = build_reconstructor(model, config.model["name"])
        auxiliaries.append(RARObjective(reconstructor, weight=config.training["rar"]["weight"]))
    return Method(name, freelb, auxiliaries)


# --- RAR's reconstructor warm-up -------------------------------------------------------------------------------

WARMUP_HEAD_FILE = "reconstructor.safetensors"
WARMUP_RECORD_FILE = "warmup.json"


def _warmup_identity(config: Config, manifest: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the warmed-up head: a run refuses a warm-up made from anything else."""
    rar = config.training["rar"]
    return {
        "model": config.model["name"],
        "overrides": config.model.get("overrides") or {},
        "max_length": config.data.max_length,
        "warmup": {
            key: rar[key] for key in ("warmup_steps", "warmup_learning_rate", "warmup_batch_size", "warmup_seed")
        },
        "data": {split: manifest["splits"][split]["sha256"] for split in ("train", "dev")},
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
    from transformers import set_seed

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    check_output_dir(out_dir, replaces=WARMUP_RECORD_FILE)
    manifest, rar = read_manifest(data_dir), config.training["rar"]
    device, lease = select_device(device_request)
    try:
        set_seed(rar["warmup_seed"], deterministic=device.type == "cpu")
        model, tokenizer = load_model(
            config.model["name"], manifest["num_labels"], config.model.get("overrides") or None, "cls"
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
        steps = _warmup_batches(train_split, rar["warmup_steps"], rar["warmup_batch_size"], rar["warmup_seed"], pad_id)
        bar = tqdm(steps, total=rar["warmup_steps"], desc=f"{dataset}/rar-warmup", unit="step", dynamic_ncols=True)
        losses = warm_up(model, reconstructor, (b.to(device) for b in bar), rar["warmup_learning_rate"], amp_dtype)
        bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
        if bad is not None:
            raise TrainingDiverged(
                f"the reconstructor warm-up diverged at step {bad + 1} (loss {losses[bad]}); nothing was written; "
                "lower training.rar.warmup_learning_rate"
            )
        after = dev_accuracy()
    finally:
        if lease is not None:
            lease.release()
    record = {
        "dataset": dataset,
        "identity": _warmup_identity(config, manifest),
        "dev_token_accuracy_before": before,
        "dev_token_accuracy_after": after,
        "losses": losses,
        "seconds": time.perf_counter() - started,
        "device": str(device),
        "versions": _versions(),
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


def _warmup_fits(warmup_dir: Path, config: Config, manifest: dict[str, Any]) -> bool:
    """Whether a run's own warm-up folder holds a warm-up of this config and data (else it is made again)."""
    try:
        _read_warmup(warmup_dir, config, manifest)
    except CarlrarError:
        return False
    return True


def _warmup_source(method: str, config: Config, manifest: dict[str, Any], rar_warmup: str | Path | None) -> str | None:
    """What a run's reconstructor starts from, for its identity: a shared warm-up's head hash, "own" or None.

    A shared warm-up is checked here, before the run folder is touched, so a wrong one is refused up front.
    """
    if method not in RAR_METHODS or not config.training["rar"]["warmup_steps"]:
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


def _start_reconstructor(
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
    if config.training["rar"]["warmup_steps"]:
        record = _load_warmup(objective.reconstructor, rar_warmup, config, manifest)
        return {
            "before_warmup": record["dev_token_accuracy_before"],
            "after_warmup": record["dev_token_accuracy_after"],
        }
    start = token_accuracy(model, objective.reconstructor, dev_batches())
    return {"before_warmup": start, "after_warmup": start}


# --- checkpoints -----------------------------------------------------------------------------------------------


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


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _module_state(module: nn.Module) -> dict[str, Any]:
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


def _restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    groups = [dict(g) for g in json.loads(state["param_groups"])]
    per_param = {int(k): v for k, v in state.get("state", {}).items()}
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    sd = optimizer.state_dict()
    return {"state": {str(k): v for k, v in sd["state"].items()}, "param_groups": json.dumps(sd["param_groups"])}


# --- the loop --------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import transformers

    return {
        "carlrar": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _make_optimizer(
    params: list[nn.Parameter], named: dict[int, str], lr: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and LayerNorm weights, as in run_glue_no_trainer.py."""
    no_decay = [
        p
        for p in params
        if named[id(p)].endswith("bias") or "LayerNorm" in named[id(p)] or "norm" in named[id(p)].lower()
    ]
    no_decay_ids = {id(p) for p in no_decay}
    decay = [p for p in params if id(p) not in no_decay_ids]
    # fused: one kernel over all parameters instead of a loop of small ops; on a CPU the default AdamW step took
    # 27 % of a MiniLM base step (0.15 s of 0.55 s, batch 16 x 20 tokens, one thread), the fused one 0.02 s.
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        fused=True,
    )


class TrainingDiverged(CarlrarError):
    """A loss, gradient or weight became NaN or infinite: the run stops before it writes anything of it."""


def _last_good(last_checkpoint: int | None) -> str:
    if last_checkpoint is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint (step {last_checkpoint}) and best/ are kept"


DIVERGENCE_ADVICE = (
    "lower training.learning_rate or the FreeLB step (datasets.<name>.freelb.adv_lr, init_mag, adv_max_norm > 0), "
    "or keep training.max_grad_norm > 0, then rerun with --restart"
)


def clip_and_measure(params: list[nn.Parameter], max_grad_norm: float) -> float:
    """Clip the gradients to ``max_grad_norm`` (0: no clipping) and return their total norm before clipping.

    The norm is what tells a diverging run (NaN or infinite) from a healthy one; clipping is unchanged.
    """
    if max_grad_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def check_finite_step(
    losses: dict[str, float],
    grad_norm: float,
    progress: Progress,
    collective: Collective,
    last: int | None,
    device: torch.device,
) -> None:
    """Stop at the first step whose loss or gradient norm is not finite, before the optimizer applies it.

    Every rank decides alike (the gradients are reduced, the losses are not), so no rank waits for another.
    """
    finite = all(math.isfinite(v) for v in losses.values()) and math.isfinite(grad_norm)
    if collective.world_size > 1:
        flag = torch.tensor([0.0 if finite else 1.0], device=device)
        finite = float(collective.mean(flag)) == 0.0
    if finite:
        return
    terms = ", ".join(f"{name} {value:.4g}" for name, value in losses.items())
    raise TrainingDiverged(
        f"training diverged at step {progress.step + 1} (epoch {progress.epoch + 1}, batch "
        f"{progress.batch_in_epoch + 1}): loss {sum(losses.values()):.4g} ({terms}), gradient norm {grad_norm:.4g}; "
        f"stopped before applying it, {_last_good(last)}; {DIVERGENCE_ADVICE}"
    )


def check_finite_weights(modules: dict[str, nn.Module], when: str, last: int | None) -> None:
    """Refuse to write a checkpoint or best/ holding NaN or infinite weights."""
    for mname, module in modules.items():
        for pname, value in module.state_dict().items():
            if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise TrainingDiverged(
                    f"training diverged: {mname}.{pname} holds non-finite values at {when}; {_last_good(last)}; "
                    f"{DIVERGENCE_ADVICE}"
                )


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    run_dir: Path


def train(
    config: Config,
    dataset: str,
    method_name: str,
    seed: int,
    data_dir: str | Path,
    run_dir: str | Path,
    device_request: str = "auto",
    rar_warmup: str | Path | None = None,
    restart: Restart = "never",
) -> TrainResult:
    """Train one (dataset, method, seed) run into ``run_dir``; resume from its checkpoint if it is this run's.

    ``rar_warmup`` is the folder of :func:`warm_up_reconstructor` for this dataset, which rar / carl_rar runs start
    their reconstructor from when ``training.rar.warmup_steps`` > 0; without it such a run makes its own.

    A checkpoint or metrics.json of another configuration in ``run_dir`` is refused (see carlrar.identity) unless
    ``restart`` is "always" (discard whatever the folder holds) or "if-changed" (discard only another run's files,
    resume this run's checkpoint: what the workflow passes).

    Started by ``torchrun --nproc_per_node N``, the ranks share each batch (see carlrar.distributed); rank 0
    evaluates and writes every file.
    """

    data_dir, run_dir = Path(data_dir), Path(run_dir)
    check_output_dir(run_dir)
    manifest = read_manifest(data_dir)
    frames = {split: read_split(data_dir, split, manifest) for split in SPLITS}  # verified before anything is touched
    warmup_source = _warmup_source(method_name, config, manifest, rar_warmup)
    data_sha256 = {split: info["sha256"] for split, info in manifest["splits"].items()}
    identity = run_identity(config, dataset, method_name, seed, data_sha256, warmup_source)
    # Rank 0 settles the folder before the process group forms; the other ranks wait for it in init_collective.
    resume = prepare_run_folder(run_dir, identity, restart) if _is_rank_zero() else None
    if warmup_source == "own":
        # No shared warm-up given (the workflow gives one per dataset): make this run's own, before the run's seed
        # is set, so the result equals a run started from a shared warm-up.
        rar_warmup = run_dir / "rar_warmup"
        if _is_rank_zero() and not _warmup_fits(rar_warmup, config, manifest):  # other ranks wait in init_collective
            warm_up_reconstructor(config, dataset, data_dir, rar_warmup, device_request)
    collective, rank_device = init_collective(device_request)
    if resume is None:
        resume = (run_dir / "checkpoint" / "state.json").is_file()
    device, lease = (rank_device, None) if rank_device is not None else select_device(device_request)
    try:
        result = _train(
            config,
            dataset,
            method_name,
            seed,
            data_dir,
            run_dir,
            manifest,
            device,
            collective,
            rar_warmup,
            identity,
            resume,
            frames,
        )
        collective.close()  # on success only: a failed rank's peers are stopped by torchrun, not by a barrier
        return result
    finally:
        if lease is not None:
            lease.release()


def _is_rank_zero() -> bool:
    """Rank 0 of a torchrun job, or a single process; known before the process group exists."""
    return os.environ.get("RANK", "0") == "0"


def _train(
    config: Config,
    dataset: str,
    method_name: str,
    seed: int,
    data_dir: Path,
    run_dir: Path,
    manifest: dict[str, Any],
    device: torch.device,
    collective: Collective,
    rar_warmup: Path | None,
    identity: dict[str, Any],
    resume: bool,
    frames: dict[str, pd.DataFrame],
) -> TrainResult:
    from transformers import set_seed

    tcfg, ds = config.training, config.dataset(dataset)
    main = collective.is_main
    amp_dtype = amp_dtype_for(tcfg["precision"], device)
    set_seed(seed, deterministic=device.type == "cpu")  # the same initial weights on every rank

    model, tokenizer = load_model(
        config.model["name"], manifest["num_labels"], config.model.get("overrides") or None, config.model["pooling"]
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    max_length = config.data.max_length
    train_split, dev_split, test_split = (encode_split(frames[s], tokenizer, max_length) for s in SPLITS)
    if len(train_split) == 0 or len(dev_split) == 0:
        raise CarlrarError(f"{data_dir}: train and dev must not be empty (rows: {len(train_split)}, {len(dev_split)})")

    if ds.batch_size < collective.world_size:
        raise CarlrarError(f"batch size {ds.batch_size} is smaller than the {collective.world_size} ranks sharing it")
    steps_per_epoch = steps_in_epoch(len(train_split), ds.batch_size, collective.world_size)
    total_steps = tcfg["max_steps"] or math.ceil(tcfg["epochs"] * steps_per_epoch)
    method = build_method(method_name, config, dataset, model, train_split.labels, seed, steps_per_epoch, collective)
    if collective.world_size > 1:  # distinct dropout masks and FreeLB noise per rank, reproducible per rank
        torch.manual_seed(seed * 1_000_003 + collective.rank)
    model.to(device)
    for module in method.modules.values():
        module.to(device)

    def dev_batches() -> Iterator[Batch]:
        order = torch.arange(len(dev_split))
        return (b.to(device) for b in batches(dev_split, order, tcfg["eval_batch_size"], pad_id))

    reconstruction = _start_reconstructor(method, model, config, manifest, rar_warmup, dev_batches) if main else {}
    modules: dict[str, nn.Module] = {"model": model, **method.modules}
    named = {id(p): f"{mname}.{pname}" for mname, mod in modules.items() for pname, p in mod.named_parameters()}
    params = parameters_of(model, method.auxiliaries)
    optimizer = _make_optimizer(params, named, tcfg["learning_rate"], tcfg["weight_decay"])
    scheduler = get_linear_schedule_with_warmup(optimizer, round(tcfg["warmup_ratio"] * total_steps), total_steps)

    checkpoint_dir, best_dir = run_dir / "checkpoint", run_dir / "best"
    progress = Progress()
    if resume:
        state, progress = load_checkpoint(checkpoint_dir)
        try:
            for mname, module in modules.items():
                module.load_state_dict(state["modules"][mname])
            _restore_optimizer(optimizer, state["optimizer"])
            scheduler.load_state_dict(json.loads(state["scheduler"]))
            _restore_rng(state["rng"][str(collective.rank)], device)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CarlrarError(
                f"the checkpoint {checkpoint_dir} does not fit this run ({first_line(exc)}); {RESTART_ADVICE}"
            ) from None
        log.info(
            "resumed %s at step %d (epoch %d, batch %d)",
            run_dir,
            progress.step,
            progress.epoch,
            progress.batch_in_epoch,
        )

    last_checkpoint = progress.step if resume else None

    def checkpoint() -> None:
        """Called on every rank: rank 0 writes the shared state and every rank's RNG."""
        nonlocal last_checkpoint
        rng = {str(r): state for r, state in enumerate(collective.gather_objects(_rng_state(device)))}
        if main:
            check_finite_weights(modules, f"step {progress.step}", last_checkpoint)
            last_checkpoint = progress.step
            state = {
                "modules": {mname: _module_state(module) for mname, module in modules.items()},
                "optimizer": _optimizer_state(optimizer),
                "scheduler": json.dumps(scheduler.state_dict()),
                "rng": rng,
            }
            save_checkpoint(checkpoint_dir, state, progress, identity)

    def save_best() -> None:
        check_finite_weights(modules, f"step {progress.step}", last_checkpoint)
        with atomic_dir(best_dir) as tmp:
            save_file(
                {
                    f"{mname}.{k}": v
                    for mname, module in modules.items()
                    if any(True for _ in module.parameters())
                    for k, v in _module_state(module).items()
                    if isinstance(v, Tensor)
                },
                str(tmp / "weights.safetensors"),
            )
            model.encoder.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

    def run_eval() -> None:
        if main:
            accuracy, _ = evaluate(model, dev_split, tcfg["eval_batch_size"], pad_id, device, amp_dtype)
            progress.history.append(
                {
                    "step": progress.step,
                    "epoch": progress.step / steps_per_epoch,
                    "dev_accuracy": accuracy,
                    "train_loss": running_loss(),
                }
            )
            log.info("step %d: dev accuracy %.4f", progress.step, accuracy)
            if accuracy > progress.best_dev_accuracy:
                progress.best_dev_accuracy, progress.best_step = accuracy, progress.step
                save_best()
        progress.recent_losses.clear()
        checkpoint()

    def running_loss() -> float | None:
        losses = progress.recent_losses
        return sum(losses) / len(losses) if losses else None

    model.train()
    bar = tqdm(
        total=total_steps,
        initial=progress.step,
        desc=f"{dataset}/{method_name}/seed{seed}",
        unit="step",
        dynamic_ncols=True,
        disable=None if main else True,
    )
    started = time.perf_counter() - progress.train_seconds
    correct = seen = 0
    while progress.step < total_steps:
        order = epoch_order(len(train_split), seed, progress.epoch)
        for batch in batches(train_split, order, ds.batch_size, pad_id, progress.batch_in_epoch, collective):
            batch = batch.to(device)
            out = adversarial_backward(model, batch, method.freelb, method.auxiliaries, progress.step, amp_dtype)
            collective.reduce_gradients(params, len(batch.labels))
            grad_norm = clip_and_measure(params, tcfg["max_grad_norm"])
            check_finite_step(out.losses, grad_norm, progress, collective, last_checkpoint, device)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.batch_in_epoch += 1
            progress.samples_seen += len(batch.labels)
            correct += int((out.logits.argmax(-1) == batch.labels).sum())
            seen += len(batch.labels)
            progress.recent_losses.append(out.total)
            progress.train_seconds = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(
                loss=f"{out.total:.4f}",
                acc=f"{correct / seen:.3f}",
                samples_s=f"{progress.samples_seen / max(progress.train_seconds, 1e-9):.1f}",
            )
            end_of_epoch = progress.batch_in_epoch == steps_per_epoch
            if end_of_epoch:
                progress.epoch += 1
                progress.batch_in_epoch = 0
            if (
                end_of_epoch
                or progress.step == total_steps
                or (tcfg["eval_every"] and progress.step % tcfg["eval_every"] == 0)
            ):
                run_eval()
            elif tcfg["checkpoint_every"] and progress.step % tcfg["checkpoint_every"] == 0:
                checkpoint()
            if progress.step >= total_steps or end_of_epoch:
                break
    bar.close()
    if not main:
        collective.barrier()
        return TrainResult(metrics={}, run_dir=run_dir)

    best = _read_best_weights(best_dir / "weights.safetensors")
    model.load_state_dict({k.removeprefix("model."): v for k, v in best.items() if k.startswith("model.")})
    test_accuracy = (
        evaluate(model, test_split, tcfg["eval_batch_size"], pad_id, device, amp_dtype)[0] if len(test_split) else None
    )
    evaluated = manifest["evaluation_split"]
    # The best weights' prediction for every example of the evaluated split: paired comparisons between methods
    # (carlrar.reporting) need per-example outcomes, not just the accuracy.
    if "rar" in method.modules:
        objective = method.modules["rar"]
        objective.load_state_dict({k.removeprefix("rar."): v for k, v in best.items() if k.startswith("rar.")})
        reconstruction["end"] = token_accuracy(model, objective.reconstructor, dev_batches())
    eval_split = dev_split if evaluated == "dev" else test_split
    _, predictions = evaluate(model, eval_split, tcfg["eval_batch_size"], pad_id, device, amp_dtype)
    write_predictions(run_dir / PREDICTIONS_FILE, eval_split.labels, predictions)
    metrics = {
        "dataset": dataset,
        "method": method_name,
        "seed": seed,
        "run_fingerprint": fingerprint(identity),
        "evaluated_split": evaluated,
        "dev_accuracy": progress.best_dev_accuracy,
        "test_accuracy": test_accuracy,
        "eval_accuracy": progress.best_dev_accuracy if evaluated == "dev" else test_accuracy,
        "best_step": progress.best_step,
        "params": count_parameters(nn.ModuleList(list(modules.values()))),
        "steps": progress.step,
        "epochs": progress.step / steps_per_epoch,
        "train_seconds": progress.train_seconds,
        "samples_per_second": progress.samples_seen / max(progress.train_seconds, 1e-9),
        "device": str(device),
        "world_size": collective.world_size,
        "history": progress.history,
        "predictions": PREDICTIONS_FILE,
        "reconstruction_dev_token_accuracy": reconstruction or None,
        "config": {
            "model": config.model,
            "data": config.raw["data"],
            "training": tcfg,
            "dataset": config.raw["datasets"][dataset],
        },
        "versions": _versions(),
        "data": {
            "manifest_sha256": sha256_file(data_dir / "manifest.json"),
            "splits": {s: info["sha256"] for s, info in manifest["splits"].items()},
        },
        "run_identity": identity,
    }
    write_json(run_dir / "metrics.json", metrics)
    collective.barrier()
    return TrainResult(metrics=metrics, run_dir=run_dir)


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


def _read_best_weights(path: Path) -> dict[str, Tensor]:
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
    weights = _read_best_weights(best / "weights.safetensors")
    try:
        metrics = read_json(metrics_path, "the run's metrics.json")
    except CarlrarError as exc:
        raise CarlrarError(f"{exc}; {RETRAIN_ADVICE}") from None
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
