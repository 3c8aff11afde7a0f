"""FreeLB (Zhu et al. 2020) and the adversarial training step that CARL and RAR plug into.

One step is a composition (SPEC 8): a clean view where an auxiliary loss wants one, K forward-backward passes on
perturbed word embeddings (plain fine-tuning is K = 1 with no perturbation), and auxiliary losses that read what
the passes produced and add to the last pass's loss. Parameter gradients accumulate over the passes; the caller
clips and steps the optimizer, so :func:`adversarial_backward` drops into any training loop.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carlrar.config import FreeLBConfig
from carlrar.hardware import bf16_is_native, cpu_capability, cpu_has_native_bf16
from carlrar.models import ClassifierOutput, TextClassifier

log = logging.getLogger(__name__)

GRAD_NORM_FLOOR = 1e-8  # the reference's guard against a zero gradient norm


@dataclass
class Batch:
    """A dynamically padded batch; ``indices`` are the examples' rows in the training set (memory banks)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    indices: Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.labels, self.indices))
        )


@dataclass
class Views:
    """What one step's passes produced, for auxiliary losses: the clean view and the last (K-th) pass."""

    batch: Batch
    adversarial: ClassifierOutput
    clean: ClassifierOutput | None = None


class AuxiliaryLoss(Protocol):
    """A loss that reads a step's views and is added to the last pass (CARL, RAR, or your own)."""

    name: str

    def wants_clean_view(self, step: int) -> bool:
        """Whether this step needs the clean view (the representation of the unperturbed input)."""

    def clean_view_needs_grad(self, step: int) -> bool:
        """Whether this step's loss backpropagates through the clean view; False when it is only read (CARL's bank
        writes before tau), so that it is computed without a graph. Optional: an auxiliary loss without this
        method is taken to need the graph whenever it wants the clean view."""

    def loss(self, views: Views, step: int) -> Tensor | None:
        """The weighted loss to add to the last pass, or None while inactive."""

    def after_backward(self, views: Views, step: int) -> None:
        """Bookkeeping on detached values once the step's gradients exist (e.g. memory-bank writes)."""


@dataclass
class StepOutput:
    """Loss values (floats, as logged) and the last pass's logits."""

    logits: Tensor
    losses: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.losses.values())


def _per_example_norm(x: Tensor, norm_type: str) -> Tensor:
    flat = x.reshape(x.size(0), -1).float()
    return (flat.norm(dim=1) if norm_type == "l2" else flat.abs().amax(dim=1)).view(-1, 1, 1)


class FreeLB:
    """FreeLB's perturbation on the raw word embeddings, as in the reference implementation (SPEC 3).

    delta lives in fp32 whatever the autocast dtype, and every norm and division is taken in fp32.
    """

    def __init__(self, config: FreeLBConfig) -> None:
        if config.norm_type not in ("l2", "linf"):
            raise ValueError(f"norm_type must be 'l2' or 'linf', not {config.norm_type!r}")
        self.config = config

    @property
    def passes(self) -> int:
        return self.config.adv_steps

    def initial_delta(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """delta0: zero, or uniform noise on real tokens scaled to init_mag (per example for l2)."""
        cfg = self.config
        mask = attention_mask.unsqueeze(-1).float()
        if cfg.init_mag == 0:
            return torch.zeros(embeds.shape, dtype=torch.float32, device=embeds.device)
        if cfg.norm_type == "l2":
            noise = torch.empty(embeds.shape, dtype=torch.float32, device=embeds.device).uniform_(-1, 1) * mask
            dims = mask.sum(dim=(1, 2)) * embeds.size(-1)
            return noise * (cfg.init_mag / dims.sqrt()).view(-1, 1, 1)
        noise = torch.empty(embeds.shape, dtype=torch.float32, device=embeds.device)
        return noise.uniform_(-cfg.init_mag, cfg.init_mag) * mask

    def ascend(self, delta: Tensor, grad: Tensor, attention_mask: Tensor) -> Tensor:
        """One normalised ascent step of size adv_lr, the optional projection, and the padding mask."""
        cfg = self.config
        mask = attention_mask.unsqueeze(-1).float()
        grad = grad.float() * mask
        delta = delta.detach() + cfg.adv_lr * grad / _per_example_norm(grad, cfg.norm_type).clamp_min(GRAD_NORM_FLOOR)
        if cfg.adv_max_norm > 0:
            if cfg.norm_type == "l2":
                norm = _per_example_norm(delta, "l2")
                delta = delta * torch.where(norm > cfg.adv_max_norm, cfg.adv_max_norm / norm, torch.ones_like(norm))
            else:
                delta = delta.clamp(-cfg.adv_max_norm, cfg.adv_max_norm)
        return (delta * mask).detach()


class _RngSnapshot:
    """Restoring the RNG before each pass gives every pass the same dropout masks (SPEC 3)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


PRECISIONS = ("auto", "bf16", "fp32")


def amp_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``training.precision`` on ``device``.

    auto = bf16 where the device computes bf16 natively (:func:`carlrar.hardware.bf16_is_native`: fast and, within
    noise, as accurate), fp32 elsewhere; bf16 = bf16 everywhere, with one warning where it is emulated (several
    times slower than fp32); fp32 = no autocast.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    native = bf16_is_native(device)
    if precision == "auto":
        return torch.bfloat16 if native else None
    if not native:
        _warn_emulated_bf16(device.type)
    return torch.bfloat16


@functools.cache
def _warn_emulated_bf16(device_type: str) -> None:
    """Once per process and device type: a job that trains, evaluates and attacks says it once, not per call."""
    where = f"this CPU ({cpu_capability()}, no AVX512-BF16 or AMX)" if device_type == "cpu" else "this GPU"
    log.warning(
        "training.precision is bf16, but bf16 autocast is emulated on %s, several times slower than fp32; "
        "set training.precision auto or fp32",
        where,
    )


def precision_record(precision: str, amp_dtype: torch.dtype | None) -> dict[str, Any]:
    """What a run's metrics.json says about its arithmetic: the setting, what it resolved to and the CPU seen."""
    return {
        "requested": precision,
        "used": "bf16" if amp_dtype == torch.bfloat16 else "fp32",
        "cpu_capability": cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
    }


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (see :func:`amp_dtype_for`); a no-op for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _needs_graph(aux: AuxiliaryLoss, step: int) -> bool:
    needs = getattr(aux, "clean_view_needs_grad", None)
    return True if needs is None else bool(needs(step))


def _detached(out: ClassifierOutput) -> ClassifierOutput:
    return ClassifierOutput(logits=out.logits.detach(), sentence=out.sentence.detach(), tokens=out.tokens.detach())


def adversarial_backward(
    model: TextClassifier,
    batch: Batch,
    freelb: FreeLB | None = None,
    auxiliaries: tuple[AuxiliaryLoss, ...] | list[AuxiliaryLoss] = (),
    step: int = 0,
    amp_dtype: torch.dtype | None = None,
) -> StepOutput:
    """Run one step's forward-backward passes and leave the accumulated gradients on the parameters.

    ``freelb=None`` is plain fine-tuning. Each pass's cross-entropy is divided by K, so the accumulated
    gradient is the mean of the K per-pass gradients; auxiliary losses join the K-th pass only.

    The clean view, when an auxiliary loss wants one, is the forward pass on the unperturbed input under the
    passes' dropout masks. Where the first pass is unperturbed (``init_mag = 0`` or no FreeLB) it IS that view,
    bit for bit, and is reused instead of run again. If a loss backpropagates through the view (CARL from tau),
    the first pass's delta gradient is taken alone (``torch.autograd.grad``, parameter gradients untouched), its
    graph is kept, and its cross-entropy joins the last pass's backward together with the auxiliary losses: every
    parameter gradient is the same sum as with a separate clean pass. Otherwise a separate clean pass runs first,
    with a graph only if a loss backpropagates through it; a view that is only read (CARL's bank writes before tau)
    is computed under ``torch.no_grad``.
    """
    device = batch.input_ids.device
    mask = batch.attention_mask
    passes = freelb.passes if freelb else 1
    delta = None
    if freelb is not None:
        with torch.no_grad():
            delta = freelb.initial_delta(model.embed(batch.input_ids), mask)
    rng = _RngSnapshot(device)
    views: Views | None = None
    clean: ClassifierOutput | None = None
    losses: dict[str, Tensor] = {"ce": torch.zeros((), device=device)}
    wanting = [aux for aux in auxiliaries if aux.wants_clean_view(step)]
    clean_graph = any(_needs_graph(aux, step) for aux in wanting)
    reuse_first = bool(wanting) and (freelb is None or freelb.config.init_mag == 0)  # pass 1 sees delta = 0
    if wanting and not reuse_first:
        rng.restore()
        with torch.set_grad_enabled(clean_graph), autocast_context(device, amp_dtype):
            clean = model(inputs_embeds=model.embed(batch.input_ids), attention_mask=mask)
    held: Tensor | None = None  # the first pass's loss when its backward joins the last pass's
    for t in range(passes):
        last = t == passes - 1
        keep = t == 0 and reuse_first and clean_graph and not last  # pass 1's graph serves the last backward too
        rng.restore()
        if delta is not None and not keep:
            delta.requires_grad_()
        with autocast_context(device, amp_dtype):
            inputs = model.embed(batch.input_ids)
            if delta is not None:
                inputs = inputs + delta
            if keep and not inputs.requires_grad:
                inputs.requires_grad_()  # frozen word embeddings: the sum is a leaf
            out = model(inputs_embeds=inputs, attention_mask=mask)
        loss = F.cross_entropy(out.logits.float(), batch.labels) / passes
        losses["ce"] += loss.detach()
        if t == 0 and reuse_first:
            clean = out if clean_graph else _detached(out)
        if last:
            views = Views(batch=batch, adversarial=out, clean=clean)
            for aux in auxiliaries:
                with autocast_context(device, amp_dtype):
                    extra = aux.loss(views, step)
                if extra is not None:
                    loss = loss + extra
                    losses[aux.name] = extra.detach()
            if held is not None:
                loss = loss + held
        if keep:
            # delta's gradient is the gradient of embeds + delta; taken there (inputs only, parameter .grad untouched),
            # the kept graph holds no leaf for the spent delta
            (grad,) = torch.autograd.grad(loss, inputs, retain_graph=True)
            held = loss
        else:
            loss.backward()
            grad = delta.grad if delta is not None else None
        del inputs
        if not last:
            assert freelb is not None and delta is not None and grad is not None
            delta = freelb.ascend(delta, grad, mask)
            del grad  # the previous delta's gradient: not kept through the next pass
    assert views is not None
    for aux in auxiliaries:
        aux.after_backward(views, step)
    return StepOutput(logits=views.adversarial.logits.detach(), losses={k: v.item() for k, v in losses.items()})


def parameters_of(
    model: nn.Module, auxiliaries: tuple[AuxiliaryLoss, ...] | list[AuxiliaryLoss] = ()
) -> list[nn.Parameter]:
    """Trainable parameters of the model and of auxiliary modules (RAR's head), tied weights once.

    RAR's decoder weight is the model's embedding matrix; an optimizer given both modules' parameters
    would see it twice.
    """
    seen: dict[int, nn.Parameter] = {}
    for module in [model, *[a for a in auxiliaries if isinstance(a, nn.Module)]]:
        for p in module.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())
