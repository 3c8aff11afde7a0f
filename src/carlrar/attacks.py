"""k-PGD on the word embeddings at evaluation time (SPEC 7; paper 4.5, Tables 4-6).

The attack perturbs the raw word-embedding lookup (``model.embed``) that FreeLB perturbs during training, with
the model in eval mode and its parameters frozen: gradients are taken with ``torch.autograd.grad`` w.r.t. the
perturbation only, so no parameter's ``.grad`` is ever written. Per example: a random start uniform inside the
l2 ball of radius epsilon (over the whole sentence, zero on padding), then k steps
``delta += alpha * g / ||g||`` of the untargeted cross-entropy on the gold label, each followed by the
projection onto the ball and the padding mask. The attacked prediction is the one at the final iterate.

Three uses:

* :func:`attack_split` -- accuracy under attack and attack success rate (Table 5, TextAttack's definitions)
  and the cosine / Euclidean distance between clean and attacked sentence representations (Table 4);
* :func:`text_samples` -- RAR's reconstructor turns attacked token states into text; the decoded sentences
  that differ from the original and fool the base model are text-form adversarial samples (Table 6);
* :func:`pgd_attack` -- one batch, for tests and custom analyses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from carlrar.adversary import Batch, amp_dtype_for, autocast_context
from carlrar.batching import EncodedSplit, batches, encode_split
from carlrar.checkpoints import TrainedRun, load_trained_run
from carlrar.config import AnalysisConfig, bound_problem
from carlrar.devices import leased_device
from carlrar.errors import CarlrarError
from carlrar.identity import METRICS_FILE
from carlrar.models import TextClassifier
from carlrar.prepared import read_manifest, read_split
from carlrar.reconstruction import decode_argmax
from carlrar.storage import atomic_dir, atomic_path, check_output_dir, check_output_file, exclusive, write_json

log = logging.getLogger(__name__)

GRAD_NORM_FLOOR = 1e-12  # guards g / ||g|| where the loss is flat in delta (e.g. a saturated softmax)
# The keyword defaults below are the config schema's ``analysis`` defaults, read once here: a caller that gives
# no settings attacks exactly as a workflow whose config leaves ``analysis`` out, and no number is written twice.
ANALYSIS_DEFAULTS = AnalysisConfig.defaults()


@dataclass
class AttackResult:
    """What one batch's attack gives, per example (all tensors on the model's device).

    Attributes:
        labels: gold labels [B].
        clean_pred / attacked_pred: argmax predictions without / with the perturbation [B].
        perturbation_norm: l2 norm of delta over the whole sentence [B] (fp32, <= epsilon).
        cosine / euclidean: between clean and attacked sentence representations R and R_adv [B] (fp32).
        delta: the final perturbation of the raw word embeddings [B, L, E] (fp32, zero on padding).
        attacked_tokens: token states [B, L, H] at the final perturbation, when asked (RAR's reconstructor input).
    """

    labels: Tensor
    clean_pred: Tensor
    attacked_pred: Tensor
    perturbation_norm: Tensor
    cosine: Tensor
    euclidean: Tensor
    delta: Tensor
    attacked_tokens: Tensor | None = None


def _norm(x: Tensor) -> Tensor:
    """Per-example l2 norm over everything but the batch dimension, fp32, shaped [B, 1, 1]."""
    return x.reshape(x.size(0), -1).float().norm(dim=1).view(-1, 1, 1)


def _project(delta: Tensor, epsilon: float, mask: Tensor) -> Tensor:
    """Onto the l2 ball of radius epsilon per example, then zero on padding."""
    norm = _norm(delta)
    scale = torch.where(norm > epsilon, epsilon / norm.clamp_min(GRAD_NORM_FLOOR), torch.ones_like(norm))
    return delta * scale * mask


def random_start(
    shape: torch.Size | tuple[int, ...], attention_mask: Tensor, epsilon: float, generator: torch.Generator
) -> Tensor:
    """Uniform in the l2 ball of radius epsilon over each example's real positions (fp32, zero on padding).

    Direction: a masked Gaussian, normalised; radius: epsilon * u ** (1 / d) with d the example's number of real
    dimensions. Noise is drawn on the generator's device (the CPU by default) so that a seed gives the same start
    on every device; scaling epsilon with the same seed scales the same start.
    """
    mask = attention_mask.unsqueeze(-1).float()
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    u = torch.rand(shape[0], generator=generator, device=generator.device, dtype=torch.float32)
    noise, u = noise.to(mask.device), u.to(mask.device)
    noise = noise * mask
    dims = (mask.sum(dim=(1, 2)) * shape[-1]).clamp_min(1)
    radius = epsilon * u.pow(1.0 / dims)
    return noise / _norm(noise).clamp_min(GRAD_NORM_FLOOR) * radius.view(-1, 1, 1)


def pgd_attack(
    model: TextClassifier,
    batch: Batch,
    epsilon: float,
    steps: int = ANALYSIS_DEFAULTS.steps,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    return_tokens: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> AttackResult:
    """Batched k-PGD (l2, per example) on the raw word embeddings; the model's parameters are never touched.

    Args:
        model: the classifier; it is run in eval mode (its previous mode is restored afterwards).
        batch: a padded batch on the model's device; ``labels`` are the gold labels the attack moves away from.
        epsilon: radius of the l2 ball per example (whole sentence). 0 gives exactly the clean predictions.
        steps: k, the number of gradient steps (0: the random start only).
        step_size: alpha; default ``ANALYSIS_DEFAULTS.step_size_ratio * epsilon`` (the schema's step size).
        generator: for the random start (a CPU generator seeded 0 when None). Reuse one across batches, or
            re-seed it, to make a comparison between settings fair.
        return_tokens: also return the attacked token states (for RAR's reconstructor).
        amp_dtype: autocast dtype for the forward passes (the run's precision, see amp_dtype_for); None: fp32.
    """
    if epsilon < 0 or steps < 0:
        raise ValueError(f"epsilon and steps must be >= 0 (got {epsilon}, {steps})")
    alpha = ANALYSIS_DEFAULTS.step_size_ratio * epsilon if step_size is None else step_size
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    device = batch.input_ids.device
    mask = batch.attention_mask.unsqueeze(-1).float()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            embeds = model.embed(batch.input_ids).detach()
            with autocast_context(device, amp_dtype):
                clean = model(inputs_embeds=embeds, attention_mask=batch.attention_mask)
        if epsilon == 0:
            # No perturbation is possible: the attacked pass IS the clean pass (bit for bit, on every device).
            delta = torch.zeros(embeds.shape, dtype=torch.float32, device=device)
            attacked = clean
        else:
            delta = random_start(embeds.shape, batch.attention_mask, epsilon, generator)
            for _ in range(steps):
                delta.requires_grad_(True)
                with torch.enable_grad():
                    with autocast_context(device, amp_dtype):
                        logits = model(inputs_embeds=embeds + delta, attention_mask=batch.attention_mask).logits
                    # Summed, not averaged: each example's gradient is its own loss's gradient, whatever B is.
                    loss = F.cross_entropy(logits.float(), batch.labels, reduction="sum")
                    (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    grad = grad.float() * mask
                    delta = delta.detach() + alpha * grad / _norm(grad).clamp_min(GRAD_NORM_FLOOR)
                    delta = _project(delta, epsilon, mask)
            delta = delta.detach()
            with torch.no_grad(), autocast_context(device, amp_dtype):
                attacked = model(inputs_embeds=embeds + delta, attention_mask=batch.attention_mask)
    finally:
        model.train(was_training)
    r, r_adv = clean.sentence.detach().float(), attacked.sentence.detach().float()
    return AttackResult(
        labels=batch.labels,
        clean_pred=clean.logits.argmax(dim=-1),
        attacked_pred=attacked.logits.argmax(dim=-1),
        perturbation_norm=_norm(delta).view(-1),
        cosine=F.cosine_similarity(r, r_adv, dim=-1),
        euclidean=(r - r_adv).norm(dim=-1),
        delta=delta,
        attacked_tokens=attacked.tokens.detach() if return_tokens else None,
    )


# --- whole splits -------------------------------------------------------------------------------------------


def run_amp_dtype(metrics: dict[str, Any], device: torch.device) -> torch.dtype | None:
    """Attack a run in the precision it was trained in: the one its metrics.json records (``precision.used``).

    Runs from before that record name only ``training.precision``, whose ``auto`` then meant bf16 on CUDA only.
    """
    used = (metrics.get("precision") or {}).get("used")
    if used is None:
        setting = metrics.get("config", {}).get("training", {}).get("precision", "auto")
        on_cuda = str(metrics.get("device", "cpu")).startswith("cuda")
        used = ("bf16" if on_cuda else "fp32") if setting == "auto" else setting
    return amp_dtype_for(used, device)


def _eps_name(epsilon: float) -> str:
    return f"{epsilon:g}"


def records_path(out_dir: str | Path, epsilon: float) -> Path:
    """Where :func:`attack_split` writes one epsilon's per-example records."""
    return Path(out_dir) / f"records_eps{_eps_name(epsilon)}.parquet"


def _max_length(metrics: dict[str, Any], manifest: dict[str, Any]) -> int:
    """The length the run was trained with (its config), else the one the data was prepared for."""
    length = (metrics.get("config") or {}).get("data", {}).get("max_length") or manifest.get("max_length")
    if not length:
        raise CarlrarError("neither the run's metrics.json nor the data manifest records max_length")
    return int(length)


SUMMARY_FILE = "summary.json"


def _check_not_a_run(out: Path, run_dir: Path) -> None:
    """Refuse an output that is a training run's folder or inside one: it would replace the run's files."""
    out, run_dir = out.resolve(), run_dir.resolve()
    inside = out == run_dir or run_dir in out.parents
    if inside or (out / METRICS_FILE).is_file() or (out.parent / METRICS_FILE).is_file():
        raise CarlrarError(
            f"--out {out} is inside a training run's folder; give it a path of its own (nothing was changed)"
        )


def _check_data(metrics: dict[str, Any], manifest: dict[str, Any], data_dir: Path, split: str, run_dir: Path) -> None:
    """Refuse to attack a run on another dataset or another sample of its evaluated split than it was evaluated on."""
    if metrics.get("dataset") and metrics["dataset"] != manifest["dataset"]:
        raise CarlrarError(f"the run was trained on {metrics['dataset']} but {data_dir} holds {manifest['dataset']}")
    recorded = (metrics.get("data") or {}).get("splits") or (metrics.get("run_identity") or {}).get("data_sha256")
    trained = (recorded or {}).get(split)
    prepared = manifest["splits"][split]["sha256"]
    if trained is None:
        log.warning(
            "%s records no data hashes: cannot check that %s is the data it was evaluated on", run_dir, data_dir
        )
    elif trained != prepared:
        raise CarlrarError(
            f"{run_dir} was evaluated on another {split} sample than {data_dir} holds (sha256 {trained[:12]} vs "
            f"{prepared[:12]}: other data.seed, sizes or files); give the data folder the run was trained on"
        )


def _check_settings(
    epsilons: list[tuple[str, str, float]], steps: int, step_size_ratio: float, batch_size: int, seed: int
) -> None:
    """The attack's settings within the bounds the config schema gives the analysis keys (as the CLI checks)."""
    settings = [
        *epsilons,
        ("steps", "analysis.steps", steps),
        ("step_size_ratio", "analysis.step_size_ratio", step_size_ratio),
        ("batch_size", "analysis.batch_size", batch_size),
        ("seed", "analysis.seed", seed),
    ]
    for name, key, value in settings:
        problem = bound_problem(key, value)
        if problem:
            raise CarlrarError(f"{name} {value} {'is ' if problem.startswith('not') else ''}{problem}")


def _check_finite_records(records: pd.DataFrame, epsilon: float, amp_dtype: torch.dtype | None) -> None:
    """Refuse to report an attack whose distances came out NaN or infinite (a success rate over them would lie)."""
    measured = records[["perturbation_norm", "cosine", "euclidean"]].to_numpy()
    if not bool(np.isfinite(measured).all()):
        raise CarlrarError(
            f"the attack at epsilon {epsilon:g} produced non-finite representation distances (the run's outputs "
            f"overflow, autocast {amp_dtype}); no summary was written; retrain the run with training.precision fp32 "
            "or a lower learning rate"
        )


def summarize(records: pd.DataFrame) -> dict[str, Any]:
    """Table 4/5 figures from per-example records (TextAttack's definitions for accuracy and success rate).

    attacked_accuracy = correct after attack / all; attack_success_rate = flipped / originally correct, where
    flipped means correct before and wrong after the attack (None when nothing was correct).
    """
    n = len(records)
    clean_ok = records["clean_pred"] == records["gold"]
    attacked_ok = records["attacked_pred"] == records["gold"]
    originally = int(clean_ok.sum())
    flipped = int((clean_ok & ~attacked_ok).sum())
    return {
        "n": n,
        "clean_accuracy": originally / n if n else None,
        "attacked_accuracy": int(attacked_ok.sum()) / n if n else None,
        "attack_success_rate": flipped / originally if originally else None,  # None: nothing to flip
        "originally_correct": originally,
        "flipped": flipped,
        "mean_cosine": float(records["cosine"].mean()) if n else None,
        "mean_euclidean": float(records["euclidean"].mean()) if n else None,
        "mean_perturbation_norm": float(records["perturbation_norm"].mean()) if n else None,
    }


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


@dataclass
class _Target:
    """A finished run, loaded on the device, with the prepared split it was evaluated on, ready to attack."""

    run: TrainedRun
    frame: pd.DataFrame
    encoded: EncodedSplit
    pad_id: int
    amp_dtype: torch.dtype | None
    device: torch.device


def _load_target(run_dir: Path, data_dir: Path, manifest: dict[str, Any], device: torch.device) -> _Target:
    """The set-up both entry points share: the run's best weights and its verified, encoded evaluation split."""
    split = manifest["evaluation_split"]
    run = load_trained_run(run_dir, device)
    _check_data(run.metrics, manifest, data_dir, split, run_dir)
    frame = read_split(data_dir, split, manifest)
    encoded = encode_split(frame, run.tokenizer, _max_length(run.metrics, manifest))
    if len(encoded) == 0:
        raise CarlrarError(f"{data_dir}/{split}.parquet has no rows to attack")
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    return _Target(run, frame, encoded, pad_id, run_amp_dtype(run.metrics, device), device)


@dataclass(frozen=True)
class _Settings:
    """k-PGD's settings besides epsilon (the config's ``analysis`` keys)."""

    steps: int
    step_size_ratio: float
    batch_size: int
    seed: int

    def check(self, epsilons: list[tuple[str, str, float]]) -> None:
        _check_settings(epsilons, self.steps, self.step_size_ratio, self.batch_size, self.seed)

    def describe(self, device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, Any]:
        """The attack as ``summary.json`` records it."""
        return {
            "name": "k-PGD",
            "norm": "l2",
            "space": "raw word embeddings",
            "steps": self.steps,
            "step_size_ratio": self.step_size_ratio,
            "random_start": "uniform in the l2 ball",
            "loss": "cross-entropy on the gold label (untargeted)",
            "seed": self.seed,
            "batch_size": self.batch_size,
            "device": str(device),
            "autocast": str(amp_dtype).removeprefix("torch.") if amp_dtype else None,
        }


def _attacked_batches(
    target: _Target, epsilon: float, settings: _Settings, desc: str, return_tokens: bool = False
) -> Iterator[tuple[Batch, AttackResult]]:
    """Every batch of the split in order with its attack; one generator seeded with ``settings.seed``, so every
    epsilon starts from the same random directions, scaled to its own radius."""
    generator = torch.Generator().manual_seed(settings.seed)
    encoded, step_size = target.encoded, settings.step_size_ratio * epsilon
    with tqdm(total=len(encoded), desc=desc, unit="ex", dynamic_ncols=True, disable=None) as bar:
        for batch in batches(encoded, torch.arange(len(encoded)), settings.batch_size, target.pad_id):
            batch = batch.to(target.device)
            yield (
                batch,
                pgd_attack(
                    target.run.model,
                    batch,
                    epsilon,
                    settings.steps,
                    step_size,
                    generator,
                    return_tokens=return_tokens,
                    amp_dtype=target.amp_dtype,
                ),
            )
            bar.update(len(batch.labels))


def _attack_records(target: _Target, epsilon: float, settings: _Settings) -> pd.DataFrame:
    """One row per example: row, gold, clean_pred, attacked_pred, perturbation_norm, cosine, euclidean."""
    columns = ("labels", "clean_pred", "attacked_pred", "perturbation_norm", "cosine", "euclidean")
    parts: dict[str, list[Tensor]] = {"row": [], **{c: [] for c in columns}}
    for batch, result in _attacked_batches(target, epsilon, settings, f"k-PGD eps={_eps_name(epsilon)}"):
        parts["row"].append(batch.indices.cpu())
        for column in columns:
            parts[column].append(getattr(result, column).cpu())
    parts["gold"] = parts.pop("labels")
    order = ("row", "gold", *columns[1:])
    return pd.DataFrame({key: torch.cat(parts[key]).numpy() for key in order})


def attack_split(
    run_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    epsilons: tuple[float, ...] | list[float] = ANALYSIS_DEFAULTS.epsilons,
    steps: int = ANALYSIS_DEFAULTS.steps,
    step_size_ratio: float = ANALYSIS_DEFAULTS.step_size_ratio,
    batch_size: int = ANALYSIS_DEFAULTS.batch_size,
    device: str = "auto",
    seed: int = ANALYSIS_DEFAULTS.seed,
) -> dict[str, Any]:
    """Attack a trained run on its dataset's evaluated split at each epsilon; write records and a summary.

    Writes ``out_dir/records_eps{eps}.parquet`` (row, gold, clean_pred, attacked_pred, perturbation_norm, cosine,
    euclidean) per epsilon and then ``out_dir/summary.json``, each atomically. Every epsilon starts from the same
    random directions (the generator is re-seeded with ``seed``), scaled to its own radius. Returns the summary.
    """
    if not epsilons:
        raise CarlrarError("give at least one epsilon")
    settings = _Settings(steps, step_size_ratio, batch_size, seed)
    settings.check([("epsilon", "analysis.epsilons[]", e) for e in epsilons])
    run_dir, data_dir, out_dir = Path(run_dir), Path(data_dir), Path(out_dir)
    _check_not_a_run(out_dir, run_dir)
    check_output_dir(out_dir, replaces=SUMMARY_FILE)  # a folder of other files is the user's, not an attack's
    manifest = read_manifest(data_dir)
    # One process per output; the records and the summary are swapped in together, so a kill leaves the old
    # complete set or the new one, never a summary beside records of another attack.
    with exclusive(out_dir), leased_device(device) as dev, atomic_dir(out_dir) as tmp:
        target = _load_target(run_dir, data_dir, manifest, dev)
        amp_dtype = target.amp_dtype
        summary: dict[str, Any] = {
            "dataset": target.run.metrics.get("dataset", manifest.get("dataset")),
            "method": target.run.metrics.get("method"),
            "seed": target.run.metrics.get("seed"),
            "run_dir": str(run_dir),
            "data_dir": str(data_dir),
            "split": manifest["evaluation_split"],
            "attack": settings.describe(dev, amp_dtype),
            "epsilons": {},
        }
        for epsilon in epsilons:
            records = _attack_records(target, epsilon, settings)
            _check_finite_records(records, epsilon, amp_dtype)
            _write_parquet(records, records_path(tmp, epsilon))
            entry = {
                "epsilon": epsilon,
                "step_size": step_size_ratio * epsilon,
                **summarize(records),
                "records": records_path(out_dir, epsilon).name,
            }
            summary["epsilons"][_eps_name(epsilon)] = entry
            log.info(
                "eps=%s: accuracy %.4f -> %.4f under attack (success rate %.4f), cosine %.4f, euclidean %.4f",
                _eps_name(epsilon),
                entry["clean_accuracy"],
                entry["attacked_accuracy"],
                _nan(entry["attack_success_rate"]),
                entry["mean_cosine"],
                entry["mean_euclidean"],
            )
        write_json(tmp / SUMMARY_FILE, summary)
    return summary


# --- text-form adversarial samples (Table 6) ----------------------------------------------------------------


@torch.no_grad()
def _predict_texts(
    run: Any, texts: list[str], max_length: int, batch_size: int, device: torch.device, amp_dtype: torch.dtype | None
) -> Tensor:
    tokenizer = run.tokenizer
    predictions = []
    for first in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[first : first + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        with autocast_context(device, amp_dtype):
            logits = run.model(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
            ).logits
        predictions.append(logits.argmax(-1).cpu())
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


@dataclass
class _Reconstructed:
    """Per example of the split: its text and RAR's text at the attacked states (both decoded alike), and RAR's
    predictions without and with the attack."""

    originals: list[str]
    decoded: list[str]
    clean_pred: list[int]
    attacked_pred: list[int]


def _reconstruct_attacked(target: _Target, epsilon: float, settings: _Settings) -> _Reconstructed:
    """k-PGD on the RAR model, then its reconstructor's argmax tokens at the attacked token states."""
    run, out = target.run, _Reconstructed([], [], [], [])
    desc = f"k-PGD + reconstruction eps={_eps_name(epsilon)}"
    for batch, result in _attacked_batches(target, epsilon, settings, desc, return_tokens=True):
        with torch.no_grad(), autocast_context(target.device, target.amp_dtype):
            logits = run.reconstructor(result.attacked_tokens)
        out.decoded += decode_argmax(logits.float(), batch.attention_mask, run.tokenizer)
        out.originals += [
            run.tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
            for row, m in zip(batch.input_ids, batch.attention_mask.bool())
        ]
        out.clean_pred += result.clean_pred.tolist()
        out.attacked_pred += result.attacked_pred.tolist()
    return out


def _judged_by_base(
    target: _Target, rec: _Reconstructed, base: TrainedRun, base_length: int, batch_size: int
) -> list[dict[str, Any]]:
    """The examples whose decoded text differs from the original, each classified by the base run both ways."""
    changed = [i for i, (a, b) in enumerate(zip(rec.originals, rec.decoded)) if a != b]
    texts = [str(t) for t in target.frame["text"]]
    on_original, on_decoded = (
        _predict_texts(base, chosen, base_length, batch_size, target.device, target.amp_dtype).tolist()
        for chosen in ([texts[i] for i in changed], [rec.decoded[i] for i in changed])
    )
    examples = []
    for i, po, pd_ in zip(changed, on_original, on_decoded):
        gold = int(target.encoded.labels[i])
        examples.append(
            {
                "row": i,
                "original": texts[i],
                "original_decoded": rec.originals[i],
                "decoded": rec.decoded[i],
                "gold": gold,
                "base_pred_original": po,
                "base_pred_decoded": pd_,
                "fools_base": po == gold and pd_ != gold,
                "rar_pred_clean": rec.clean_pred[i],
                "rar_pred_attacked": rec.attacked_pred[i],
            }
        )
    return examples


def text_samples(
    rar_run_dir: str | Path,
    base_run_dir: str | Path,
    data_dir: str | Path,
    out_path: str | Path,
    epsilon: float = ANALYSIS_DEFAULTS.samples_epsilon,
    steps: int = ANALYSIS_DEFAULTS.steps,
    step_size_ratio: float = ANALYSIS_DEFAULTS.step_size_ratio,
    batch_size: int = ANALYSIS_DEFAULTS.batch_size,
    device: str = "auto",
    seed: int = ANALYSIS_DEFAULTS.seed,
) -> dict[str, Any]:
    """Text-form adversarial samples (Table 6) from a RAR / CARL+RAR run, judged by the base run.

    Attacks the RAR model with k-PGD on the evaluated split, decodes its reconstructor's argmax tokens at the
    attacked token states, and keeps the examples whose decoded text differs from the original (both decoded
    the same way, ``skip_special_tokens=True``, so tokenisation normalisation is no difference). For each, the
    base run classifies the original text and the decoded text (re-tokenised with the base run's tokenizer);
    ``fools_base`` is true when the original is right and the decoded text wrong. Writes ``out_path`` (JSON)
    atomically and returns it.
    """
    settings = _Settings(steps, step_size_ratio, batch_size, seed)
    settings.check([("epsilon", "analysis.samples_epsilon", epsilon)])
    data_dir, out_path = Path(data_dir), Path(out_path)
    for run in (Path(rar_run_dir), Path(base_run_dir)):
        _check_not_a_run(out_path, run)
    check_output_file(out_path)
    manifest = read_manifest(data_dir)
    split = manifest["evaluation_split"]
    with exclusive(out_path), leased_device(device) as dev:
        target = _load_target(Path(rar_run_dir), data_dir, manifest, dev)
        rar = target.run
        if rar.reconstructor is None:
            raise CarlrarError(f"{rar_run_dir} has no reconstructor: give a 'rar' or 'carl_rar' run")
        base = load_trained_run(base_run_dir, dev)
        _check_data(base.metrics, manifest, data_dir, split, Path(base_run_dir))
        if rar.metrics.get("seed") != base.metrics.get("seed"):
            log.warning(
                "the RAR run has seed %s but the base run seed %s", rar.metrics.get("seed"), base.metrics.get("seed")
            )
        reconstructed = _reconstruct_attacked(target, epsilon, settings)
        examples = _judged_by_base(target, reconstructed, base, _max_length(base.metrics, manifest), batch_size)
        run_info = {"method": rar.metrics.get("method"), "seed": rar.metrics.get("seed")}
        report = {
            "dataset": rar.metrics.get("dataset", manifest.get("dataset")),
            "split": split,
            **run_info,
            "rar_run": {"dir": str(rar_run_dir), **run_info},
            "base_run": {
                "dir": str(base_run_dir),
                "method": base.metrics.get("method"),
                "seed": base.metrics.get("seed"),
            },
            "label_names": manifest.get("label_names"),
            "attack": {
                "name": "k-PGD",
                "norm": "l2",
                "epsilon": epsilon,
                "steps": steps,
                "step_size": step_size_ratio * epsilon,
                "seed": seed,
                "device": str(dev),
            },
            "n_examples": len(target.encoded),
            "n_changed": len(examples),
            "n_fool_base": sum(e["fools_base"] for e in examples),
            "examples": examples,
        }
        write_json(out_path, report)
        return report


__all__ = [
    "ANALYSIS_DEFAULTS",
    "AttackResult",
    "attack_split",
    "pgd_attack",
    "random_start",
    "records_path",
    "summarize",
    "text_samples",
]
