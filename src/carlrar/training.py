"""The training loop behind ``carlrar train``: readable, resumable, and reproducible on CPU bit for bit.

Shape after Hugging Face's ``run_glue_no_trainer.py``: tokenise once, AdamW with a linear schedule, gradient
clipping, dynamic padding, bf16 autocast where the device computes bf16 natively (``training.precision: auto``).
Dev accuracy is evaluated every ``eval_every`` steps and at each epoch end; the best weights are kept and
evaluated on the test split. A resumable checkpoint (model, optimizer, scheduler, RNG states, memory banks,
position in the epoch) is written atomically, so a killed run restarted with the same command continues where
it stopped and ends with the same metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from carlrar.adversary import (
    Batch,
    adversarial_backward,
    amp_dtype_for,
    parameters_of,
    precision_record,
)
from carlrar.batching import EncodedSplit, batches, encode_split, epoch_order, evaluate, steps_in_epoch
from carlrar.checkpoints import (
    Progress,
    load_checkpoint,
    module_state,
    optimizer_state,
    read_best_weights,
    restore_optimizer,
    restore_rng,
    rng_state,
    save_checkpoint,
    write_predictions,
)
from carlrar.config import Config
from carlrar.devices import select_device
from carlrar.distributed import Collective, init_collective
from carlrar.errors import CarlrarError, TrainingDiverged, first_line
from carlrar.identity import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    RESTART_ADVICE,
    Restart,
    claim_run_folder,
    fingerprint,
    library_versions,
    prepare_run_folder,
    run_identity,
)
from carlrar.methods import Method, build_method
from carlrar.models import TextClassifier, count_parameters, load_model
from carlrar.prepared import SPLITS, read_manifest, read_split
from carlrar.rar_warmup import start_reconstructor, warm_up_reconstructor, warmup_fits, warmup_source
from carlrar.reconstruction import (
    token_accuracy,
)
from carlrar.storage import atomic_dir, check_output_dir, exclusive, sha256_file, write_json

log = logging.getLogger(__name__)


def make_optimizer(
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


def _last_good(last_checkpoint: int | None) -> str:
    if last_checkpoint is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint (step {last_checkpoint}) and best/ are kept"


DIVERGENCE_ADVICE = (
    "lower training.learning_rate or the FreeLB step (datasets.<name>.freelb.adv_lr, init_mag, adv_max_norm > 0), "
    "or keep training.max_grad_norm > 0, then rerun with --restart"
)
# CARL's scores are exp(x1 . x2 / T): at a small temperature T they overflow while the classifier's loss is fine.
CARL_DIVERGENCE_ADVICE = (
    "CARL's loss L_D went non-finite while the classification loss did not: raise training.carl.temperature "
    "(scores exp(x1 . x2 / T) overflow at a small T), then rerun with --restart"
)


def divergence_advice(losses: dict[str, float]) -> str:
    """The setting to change: CARL's temperature when only its L_D is non-finite, else the step sizes."""
    carl, ce = losses.get("carl", 0.0), losses.get("ce", 0.0)
    return CARL_DIVERGENCE_ADVICE if not math.isfinite(carl) and math.isfinite(ce) else DIVERGENCE_ADVICE


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
        f"stopped before applying it, {_last_good(last)}; {divergence_advice(losses)}"
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
    # One process per run folder: a second one on the same --out fails at once, naming the holder.
    with exclusive(run_dir) if _is_rank_zero() else contextlib.nullcontext():
        return _train_in(config, dataset, method_name, seed, data_dir, run_dir, device_request, rar_warmup, restart)


def _train_in(
    config: Config,
    dataset: str,
    method_name: str,
    seed: int,
    data_dir: Path,
    run_dir: Path,
    device_request: str,
    rar_warmup: str | Path | None,
    restart: Restart,
) -> TrainResult:
    """train() once it holds the run folder: check the data, settle the folder, then train or resume."""
    manifest = read_manifest(data_dir)
    if manifest["dataset"] != dataset:
        raise CarlrarError(
            f"--data {data_dir} holds the prepared {manifest['dataset']} data, not {dataset}; "
            f"give --data the folder `carlrar prepare --dataset {dataset}` wrote (nothing was changed)"
        )
    frames = {split: read_split(data_dir, split, manifest) for split in SPLITS}  # verified before anything is touched
    source = warmup_source(method_name, config, manifest, rar_warmup)
    data_sha256 = {split: info["sha256"] for split, info in manifest["splits"].items()}
    identity = run_identity(config, dataset, method_name, seed, data_sha256, source, device_request)
    # Rank 0 settles the folder before the process group forms; the other ranks wait for it in init_collective.
    start = prepare_run_folder(run_dir, identity, restart) if _is_rank_zero() else None
    if start == "finished":
        log.info("%s is finished (its results match this run; its checkpoint was removed): nothing to train", run_dir)
        return TrainResult(json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8")), run_dir)
    if source == "own":
        # No shared warm-up given (the workflow gives one per dataset): make this run's own, before the run's seed
        # is set, so the result equals a run started from a shared warm-up.
        rar_warmup = run_dir / "rar_warmup"
        if _is_rank_zero() and not warmup_fits(rar_warmup, config, manifest):  # other ranks wait in init_collective
            claim_run_folder(run_dir)
            warm_up_reconstructor(config, dataset, data_dir, rar_warmup, device_request)
    collective, rank_device = init_collective(device_request)
    resume = start == "resume" if start is not None else (run_dir / "checkpoint" / "state.json").is_file()
    device, lease = (rank_device, None) if rank_device is not None else select_device(device_request)
    try:
        run = _set_up(
            config, dataset, method_name, seed, data_dir, run_dir, manifest, device, collective, identity, frames
        )
        result = _train(run, manifest, data_dir, rar_warmup, resume)
        collective.close()  # on success only: a failed rank's peers are stopped by torchrun, not by a barrier
        return result
    finally:
        if lease is not None:
            lease.release()


def _is_rank_zero() -> bool:
    """Rank 0 of a torchrun job, or a single process; known before the process group exists."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class _Run:
    """Everything one training run holds while it trains: the loop below reads and updates it."""

    config: Config
    dataset: str
    method_name: str
    seed: int
    run_dir: Path
    identity: dict[str, Any]
    device: torch.device
    collective: Collective
    amp_dtype: torch.dtype | None
    model: TextClassifier
    tokenizer: PreTrainedTokenizerBase
    pad_id: int
    splits: dict[str, EncodedSplit]
    method: Method
    modules: dict[str, nn.Module]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    total_steps: int
    progress: Progress = field(default_factory=Progress)
    last_checkpoint: int | None = None  # the step of the last checkpoint written (None: none yet)

    @property
    def eval_batch_size(self) -> int:
        return self.config.training["eval_batch_size"]

    def dev_batches(self) -> Iterator[Batch]:
        order = torch.arange(len(self.splits["dev"]))
        dev = self.splits["dev"]
        return (b.to(self.device) for b in batches(dev, order, self.eval_batch_size, self.pad_id))

    def evaluate(self, split: str) -> tuple[float, Tensor]:
        return evaluate(self.model, self.splits[split], self.eval_batch_size, self.pad_id, self.device, self.amp_dtype)

    def checkpoint(self) -> None:
        """Called on every rank: rank 0 writes the shared state and every rank's RNG."""
        rng = {str(r): state for r, state in enumerate(self.collective.gather_objects(rng_state(self.device)))}
        if self.collective.is_main:
            check_finite_weights(self.modules, f"step {self.progress.step}", self.last_checkpoint)
            claim_run_folder(self.run_dir)
            self.last_checkpoint = self.progress.step
            state = {
                "modules": {name: module_state(module) for name, module in self.modules.items()},
                "optimizer": optimizer_state(self.optimizer),
                "scheduler": json.dumps(self.scheduler.state_dict()),
                "rng": rng,
            }
            save_checkpoint(self.run_dir / "checkpoint", state, self.progress, self.identity)

    def save_best(self) -> None:
        check_finite_weights(self.modules, f"step {self.progress.step}", self.last_checkpoint)
        claim_run_folder(self.run_dir)
        with atomic_dir(self.run_dir / "best") as tmp:
            save_file(
                {
                    f"{name}.{k}": v
                    for name, module in self.modules.items()
                    if any(True for _ in module.parameters())
                    for k, v in module_state(module).items()
                    if isinstance(v, Tensor)
                },
                str(tmp / "weights.safetensors"),
            )
            self.model.encoder.config.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)

    def evaluate_dev(self) -> None:
        """Dev accuracy into the history; new best weights saved; then a checkpoint (every rank takes part)."""
        progress = self.progress
        if self.collective.is_main:
            accuracy, _ = self.evaluate("dev")
            losses = progress.recent_losses
            progress.history.append(
                {
                    "step": progress.step,
                    "epoch": progress.step / self.steps_per_epoch,
                    "dev_accuracy": accuracy,
                    "train_loss": sum(losses) / len(losses) if losses else None,
                }
            )
            log.info("step %d: dev accuracy %.4f", progress.step, accuracy)
            if accuracy > progress.best_dev_accuracy:
                progress.best_dev_accuracy, progress.best_step = accuracy, progress.step
                self.save_best()
        progress.recent_losses.clear()
        self.checkpoint()


def _train(run: _Run, manifest: dict[str, Any], data_dir: Path, rar_warmup: Path | None, resume: bool) -> TrainResult:
    """The run from its set-up to metrics.json: reconstructor start, resume, the loop, the final evaluation."""
    collective, run_dir = run.collective, run.run_dir
    reconstruction = (
        start_reconstructor(run.method, run.model, run.config, manifest, rar_warmup, run.dev_batches)
        if collective.is_main
        else {}
    )
    if resume:
        _resume(run)
    _fit(run)
    if not collective.is_main:
        collective.barrier()
        return TrainResult(metrics={}, run_dir=run_dir)
    metrics = _finish(run, manifest, data_dir, reconstruction)
    write_json(run_dir / "metrics.json", metrics)
    collective.barrier()
    return TrainResult(metrics=metrics, run_dir=run_dir)


# --- set-up: model, data, method, optimizer and schedule -------------------------------------------------------
def _set_up(
    config: Config,
    dataset: str,
    method_name: str,
    seed: int,
    data_dir: Path,
    run_dir: Path,
    manifest: dict[str, Any],
    device: torch.device,
    collective: Collective,
    identity: dict[str, Any],
    frames: dict[str, pd.DataFrame],
) -> _Run:
    from transformers import set_seed

    tcfg, ds = config.training, config.dataset(dataset)
    set_seed(seed, deterministic=device.type == "cpu")  # the same initial weights on every rank
    model, tokenizer = load_model(
        config.model["name"],
        manifest["num_labels"],
        config.model.get("overrides") or None,
        config.model["pooling"],
        config.data.max_length,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    splits = {s: encode_split(frames[s], tokenizer, config.data.max_length) for s in SPLITS}
    if len(splits["train"]) == 0 or len(splits["dev"]) == 0:
        rows = (len(splits["train"]), len(splits["dev"]))
        raise CarlrarError(f"{data_dir}: train and dev must not be empty (rows: {rows[0]}, {rows[1]})")
    if ds.batch_size < collective.world_size:
        raise CarlrarError(f"batch size {ds.batch_size} is smaller than the {collective.world_size} ranks sharing it")
    steps_per_epoch = steps_in_epoch(len(splits["train"]), ds.batch_size, collective.world_size)
    total_steps = tcfg["max_steps"] or math.ceil(tcfg["epochs"] * steps_per_epoch)
    labels = splits["train"].labels
    method = build_method(method_name, config, dataset, model, labels, seed, steps_per_epoch, collective)
    if collective.world_size > 1:  # distinct dropout masks and FreeLB noise per rank, reproducible per rank
        torch.manual_seed(seed * 1_000_003 + collective.rank)
    model.to(device)
    for module in method.modules.values():
        module.to(device)
    modules: dict[str, nn.Module] = {"model": model, **method.modules}
    named = {id(p): f"{mname}.{pname}" for mname, mod in modules.items() for pname, p in mod.named_parameters()}
    params = parameters_of(model, method.auxiliaries)
    optimizer = make_optimizer(params, named, tcfg["learning_rate"], tcfg["weight_decay"])
    scheduler = get_linear_schedule_with_warmup(optimizer, round(tcfg["warmup_ratio"] * total_steps), total_steps)
    amp_dtype = amp_dtype_for(tcfg["precision"], device)
    return _Run(
        config, dataset, method_name, seed, run_dir, identity, device, collective, amp_dtype, model, tokenizer,
        pad_id, splits, method, modules, params, optimizer, scheduler, steps_per_epoch, total_steps,
    )  # fmt: skip


# --- resume: this run's own checkpoint (carlrar.identity has refused any other) ----------------------------------
def _resume(run: _Run) -> None:
    checkpoint_dir = run.run_dir / "checkpoint"
    state, run.progress = load_checkpoint(checkpoint_dir)
    try:
        for name, module in run.modules.items():
            module.load_state_dict(state["modules"][name])
        restore_optimizer(run.optimizer, state["optimizer"])
        run.scheduler.load_state_dict(json.loads(state["scheduler"]))
        restore_rng(state["rng"][str(run.collective.rank)], run.device)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CarlrarError(
            f"the checkpoint {checkpoint_dir} does not fit this run ({first_line(exc)}); {RESTART_ADVICE}"
        ) from None
    run.last_checkpoint = run.progress.step
    at = run.progress
    log.info("resumed %s at step %d (epoch %d, batch %d)", run.run_dir, at.step, at.epoch, at.batch_in_epoch)


# --- the loop: one FreeLB/CARL/RAR step per batch, dev evaluation and checkpoints on schedule -------------------
def _fit(run: _Run) -> None:
    tcfg, progress, main = run.config.training, run.progress, run.collective.is_main
    batch_size = run.config.dataset(run.dataset).batch_size
    run.model.train()
    bar = tqdm(
        total=run.total_steps,
        initial=progress.step,
        desc=f"{run.dataset}/{run.method_name}/seed{run.seed}",
        unit="step",
        dynamic_ncols=True,
        disable=None if main else True,
    )
    started = time.perf_counter() - progress.train_seconds
    correct = seen = 0
    while progress.step < run.total_steps:
        order = epoch_order(len(run.splits["train"]), run.seed, progress.epoch)
        train_batches = batches(
            run.splits["train"], order, batch_size, run.pad_id, progress.batch_in_epoch, run.collective
        )
        for batch in train_batches:
            batch = batch.to(run.device)
            out = adversarial_backward(
                run.model, batch, run.method.freelb, run.method.auxiliaries, progress.step, run.amp_dtype
            )
            run.collective.reduce_gradients(run.params, len(batch.labels))
            grad_norm = clip_and_measure(run.params, tcfg["max_grad_norm"])
            check_finite_step(out.losses, grad_norm, progress, run.collective, run.last_checkpoint, run.device)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
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
            end_of_epoch = progress.batch_in_epoch == run.steps_per_epoch
            if end_of_epoch:
                progress.epoch += 1
                progress.batch_in_epoch = 0
            if (
                end_of_epoch
                or progress.step == run.total_steps
                or (tcfg["eval_every"] and progress.step % tcfg["eval_every"] == 0)
            ):
                run.evaluate_dev()
            elif tcfg["checkpoint_every"] and progress.step % tcfg["checkpoint_every"] == 0:
                run.checkpoint()
            if progress.step >= run.total_steps or end_of_epoch:
                break
    bar.close()


# --- the end: best weights on test, per-example predictions, metrics.json ------------------------------------
def _finish(run: _Run, manifest: dict[str, Any], data_dir: Path, reconstruction: dict[str, float]) -> dict[str, Any]:
    progress, tcfg = run.progress, run.config.training
    best = read_best_weights(run.run_dir / "best" / "weights.safetensors")
    run.model.load_state_dict({k.removeprefix("model."): v for k, v in best.items() if k.startswith("model.")})
    evaluated = manifest["evaluation_split"]
    # The best weights' prediction for every example of the evaluated split: paired comparisons between methods
    # (carlrar.paired) need per-example outcomes, not just the accuracy. Where test is the evaluated split, the
    # same pass gives the test accuracy: a second pass over the split would only repeat it.
    evaluated_accuracy, predictions = run.evaluate(evaluated)
    if evaluated == "test":
        test_accuracy = evaluated_accuracy
    else:
        test_accuracy = run.evaluate("test")[0] if len(run.splits["test"]) else None
    if "rar" in run.method.modules:
        objective = run.method.modules["rar"]
        objective.load_state_dict({k.removeprefix("rar."): v for k, v in best.items() if k.startswith("rar.")})
        reconstruction["end"] = token_accuracy(run.model, objective.reconstructor, run.dev_batches())
    write_predictions(run.run_dir / PREDICTIONS_FILE, run.splits[evaluated].labels, predictions)
    return {
        "dataset": run.dataset,
        "method": run.method_name,
        "seed": run.seed,
        "run_fingerprint": fingerprint(run.identity),
        "evaluated_split": evaluated,
        "dev_accuracy": progress.best_dev_accuracy,
        "test_accuracy": test_accuracy,
        "eval_accuracy": progress.best_dev_accuracy if evaluated == "dev" else test_accuracy,
        "best_step": progress.best_step,
        "params": count_parameters(nn.ModuleList(list(run.modules.values()))),
        "steps": progress.step,
        "epochs": progress.step / run.steps_per_epoch,
        "train_seconds": progress.train_seconds,
        "samples_per_second": progress.samples_seen / max(progress.train_seconds, 1e-9),
        "device": str(run.device),
        "precision": precision_record(tcfg["precision"], run.amp_dtype),
        "world_size": run.collective.world_size,
        "history": progress.history,
        "predictions": PREDICTIONS_FILE,
        # what attacks check before they trust best/: the weights these metrics describe
        "best_weights_sha256": sha256_file(run.run_dir / "best" / "weights.safetensors"),
        "reconstruction_dev_token_accuracy": reconstruction or None,
        "config": {
            "model": run.config.model,
            "data": run.config.raw["data"],
            "training": tcfg,
            "dataset": run.config.raw["datasets"][run.dataset],
        },
        "versions": library_versions(),
        "data": {
            "manifest_sha256": sha256_file(data_dir / "manifest.json"),
            "splits": {s: info["sha256"] for s, info in manifest["splits"].items()},
        },
        "run_identity": run.identity,
    }
