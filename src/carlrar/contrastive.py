"""CARL: contrastive adversarial representation learning (paper 3.2, SPEC section 4).

The loss pulls the clean representation R and the adversarial representation R_adv of the same example
together and pushes each away from examples of *other* labels. Negatives come from two memory banks
(B_orig, B_adv; Eq. 5) so that thousands of them cost one gather and one matrix product instead of a forward
pass each. This module is pure torch: a training loop owns a :class:`CARLLoss` and calls

    carl.update_banks(idx, clean_rep.detach(), adv_rep.detach())   # from one epoch before tau
    loss = carl(idx, labels, clean_rep, adv_rep)                    # from step tau on

computing the loss first and updating the banks after it in the same step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carlrar.distributed import Collective

LOSS_FORMS = ("nce", "infonce")
NCE_EPS = 1e-7  # Tian et al.'s constant, kept so the loss matches the CRD reference value for value.
Z_MOMENTUM = 0.99  # weight of the running Z against the current batch's estimate (SPEC 4)


class MemoryBank(nn.Module):
    """One L2-normalised row per training example, updated with momentum (Eq. 5).

    Rows and the ``filled`` flags are registered buffers so that ``state_dict()`` checkpoints them and
    ``.to(device)`` moves them: the bank is part of the resumable training state.
    """

    rows: Tensor
    filled: Tensor

    def __init__(self, num_rows: int, dim: int, momentum: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("rows", torch.zeros(num_rows, dim, dtype=torch.float32))
        self.register_buffer("filled", torch.zeros(num_rows, dtype=torch.bool))

    @torch.no_grad()
    def update(self, indices: Tensor, features: Tensor) -> None:
        """B[i] = normalise(M * B[i] + (1 - M) * normalise(R_i)); a row's first write copies normalise(R_i).

        Rows start at zero rather than random (CRD) so no noise leaks into the negatives; copying the first
        write explicitly keeps it exact for any M (M = 1 included), and ``filled`` tells when every row
        holds a real representation. Indices must be unique: with duplicates a scatter's result is undefined.
        """
        indices = indices.to(self.rows.device)
        if indices.unique().numel() != indices.numel():
            raise ValueError("MemoryBank.update got duplicate indices in one batch")
        new = F.normalize(features.detach().to(device=self.rows.device, dtype=torch.float32), dim=1)
        mixed = F.normalize(self.momentum * self.rows[indices] + (1.0 - self.momentum) * new, dim=1)
        self.rows[indices] = torch.where(self.filled[indices].unsqueeze(1), mixed, new)
        self.filled[indices] = True

    def is_full(self) -> bool:
        """True once every row has been written at least once, i.e. every negative is a real representation."""
        return bool(self.filled.all())


def _indices_of_other_labels(labels: Tensor, m: int) -> dict[int, Tensor]:
    """For each class, the indices of rows with another label; fails early if fewer than m exist.

    Raising here, at construction, turns a dataset/m mismatch into a start-up error instead of a crash
    at step tau, hours into training.
    """
    others: dict[int, Tensor] = {}
    for c in labels.unique().tolist():
        candidates = (labels != c).nonzero().squeeze(1)
        if candidates.numel() < m:
            raise ValueError(
                f"class {c}: m={m} negatives requested but only {candidates.numel()} training rows have another label"
            )
        others[c] = candidates
    return others


class ClassAwareNegativeSampler(nn.Module):
    """Draws one set of m negatives per class present in a batch (SPEC 4, efficiency requirement).

    Every anchor of class c shares the set, which is drawn uniformly without replacement among rows whose
    label differs from c; each anchor therefore sees negatives from the same distribution as with per-example
    draws, but the bank gather is [m, dim] per class instead of [batch, m, dim]. The sampler owns its
    ``torch.Generator`` and checkpoints its state (and the labels, to refuse a resume on another dataset)
    through ``get_extra_state``, so a resumed run draws exactly the negatives an uninterrupted run would.
    """

    def __init__(self, labels: Tensor, m: int, seed: int = 0) -> None:
        super().__init__()
        if m < 1:
            raise ValueError(f"the number of negatives m must be >= 1, got {m}")
        self.labels = labels.detach().to(device="cpu", dtype=torch.long)
        self.m = m
        self._others = _indices_of_other_labels(self.labels, m)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def draw(self, batch_labels: Tensor) -> dict[int, Tensor]:
        """Map each class in ``batch_labels`` (ascending) to a CPU LongTensor of m distinct row indices."""
        draws: dict[int, Tensor] = {}
        for c in batch_labels.unique().tolist():
            candidates = self._others[c]
            draws[c] = candidates[torch.randperm(candidates.numel(), generator=self.generator)[: self.m]]
        return draws

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"rng_state": self.generator.get_state(), "labels": self.labels}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not torch.equal(state["labels"].cpu(), self.labels):
            raise ValueError("sampler state was saved for different training labels")
        self.generator.set_state(state["rng_state"].cpu())


def sample_negatives_per_example(labels: Tensor, anchor_labels: Tensor, m: int, generator: torch.Generator) -> Tensor:
    """Reference sampler: each anchor gets its own m negatives of other labels, without replacement.

    Returns a [batch, m] LongTensor. It is the literal reading of the paper, kept to check the class-aware
    sampler against; training uses :class:`ClassAwareNegativeSampler`.
    """
    others = _indices_of_other_labels(labels.cpu(), m)
    return torch.stack(
        [others[y][torch.randperm(others[y].numel(), generator=generator)[:m]] for y in anchor_labels.tolist()]
    )


def infonce_loss(pos_logits: Tensor, neg_logits: Tensor) -> Tensor:
    """Exact cross-entropy over [positive, m negatives], averaged over the batch.

    Takes logits x1.x2/T ([batch] and [batch, m]) rather than scores h = exp(logit), because
    -log(h_pos / (h_pos + sum_j h_neg_j)) = logsumexp([pos, negs]) - pos is stable where h overflows.
    """
    pos_logits, neg_logits = pos_logits.float(), neg_logits.float()
    all_logits = torch.cat([pos_logits.unsqueeze(1), neg_logits], dim=1)
    return (torch.logsumexp(all_logits, dim=1) - pos_logits).mean()


def nce_loss(pos_logits: Tensor, neg_logits: Tensor, z: Tensor | float, num_rows: int) -> Tensor:
    """Tian et al.'s NCE loss (CRD ``ContrastLoss``), from logits [batch] and [batch, m].

    P = exp(logit) / Z estimates the data probability and Pn = 1/N the noise probability; the positive
    contributes log(P / (P + m Pn + eps)) and each negative log(m Pn / (P + m Pn + eps)).
    Loss = -(sum of those logs) / batch.
    """
    m_pn = neg_logits.shape[1] / num_rows
    p_pos = pos_logits.float().exp() / z
    p_neg = neg_logits.float().exp() / z
    log_d1 = torch.log(p_pos / (p_pos + m_pn + NCE_EPS))
    log_d0 = torch.log(m_pn / (p_neg + m_pn + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / pos_logits.shape[0]


class CARLLoss(nn.Module):
    """The auxiliary loss L_D = L_D^a + L_D^o (Eq. 3) with its memory banks, sampler and NCE constants.

    L_D^a anchors on R_adv, with positive the live R and negatives from B_orig; L_D^o anchors on R, with
    positive the live R_adv and negatives from B_adv. Both directions use the same negative examples (the
    paper's v_{i,j}^n), read from the two banks. Gradients reach both live views; bank rows are constants.

    ``forward`` does NOT write the banks: the caller calls :meth:`update_banks` after the loss, so the loss
    only sees representations from earlier steps and the bank writes can start an epoch before the loss
    does. The anchor's own row is never a negative because negatives carry another label.

    For ``loss="nce"`` the normalising constants Z (one per direction, buffers ``z_a``/``z_o``; -1 means
    "not estimated yet", as in CRD) are set to mean score * N on the first training-mode call and then
    tracked with Z <- 0.99 Z + 0.01 Z_batch; the mean is over the positive and the m negative scores of
    every anchor, as in CRD. In eval mode Z is used but not updated.
    """

    z_a: Tensor
    z_o: Tensor

    def __init__(
        self,
        labels: Tensor,
        dim: int,
        negatives: int,
        temperature: float = 0.07,
        momentum: float = 0.5,
        loss: str = "nce",
        seed: int = 0,
        collective: Collective | None = None,
    ) -> None:
        super().__init__()
        if loss not in LOSS_FORMS:
            raise ValueError(f"loss must be one of {LOSS_FORMS}, got {loss!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.loss = loss
        self.temperature = temperature
        self.num_rows = labels.numel()
        self.sampler = ClassAwareNegativeSampler(labels, negatives, seed)
        self.bank_orig = MemoryBank(self.num_rows, dim, momentum)
        self.bank_adv = MemoryBank(self.num_rows, dim, momentum)
        # Data-parallel training: banks are written with the whole global batch and negatives drawn for its
        # classes, so every rank holds the same banks and advances the same sampler RNG.
        self.collective = collective or Collective()
        self.register_buffer("z_a", torch.tensor(-1.0))
        self.register_buffer("z_o", torch.tensor(-1.0))

    def update_banks(self, indices: Tensor, clean: Tensor, adv: Tensor) -> None:
        """Write R into B_orig and R_adv into B_adv for the batch's rows (Eq. 5), detached."""
        gather = self.collective.gather
        indices = gather(indices)
        self.bank_orig.update(indices, gather(clean.detach().float()))
        self.bank_adv.update(indices, gather(adv.detach().float()))

    def forward(self, indices: Tensor, labels: Tensor, clean: Tensor, adv: Tensor) -> Tensor:
        """L_D for a batch: ``indices`` are dataset rows, ``clean``/``adv`` the live [batch, dim] views.

        Runs in fp32 with autocast disabled, whatever the input dtype: exp(x/T) with T = 0.07 spans six
        orders of magnitude, beyond what bf16 resolves. For each class in the batch one negative set is
        gathered ([m, dim]) and scored against that class's anchors with one matrix product; the losses
        are sums over anchors, so grouping anchors by class needs no reordering.
        """
        if not (self.bank_orig.is_full() and self.bank_adv.is_full()):
            raise RuntimeError(
                "CARL loss called before every memory-bank row was written; write the banks for a full "
                "epoch (update_banks) before switching the loss on"
            )
        if not torch.equal(labels.cpu().long(), self.sampler.labels[indices.cpu()]):
            raise ValueError("labels do not match the training labels at these indices")
        device = self.bank_orig.rows.device
        with torch.autocast(device_type=device.type, enabled=False):
            clean = F.normalize(clean.float(), dim=1)
            adv = F.normalize(adv.float(), dim=1)
            pos, neg_a, neg_o = [], [], []
            local_classes = set(labels.unique().tolist())
            for c, negative_rows in self.sampler.draw(self.collective.gather(labels)).items():
                if c not in local_classes:
                    continue
                anchors = (labels == c).to(device)
                negative_rows = negative_rows.to(device)
                pos.append((adv[anchors] * clean[anchors]).sum(dim=1) / self.temperature)
                # index_select copies whole rows: the same values as rows[negative_rows], 4-9x faster on a CPU
                neg_a.append(adv[anchors] @ self.bank_orig.rows.index_select(0, negative_rows).T / self.temperature)
                neg_o.append(clean[anchors] @ self.bank_adv.rows.index_select(0, negative_rows).T / self.temperature)
            pos_logits = torch.cat(pos)
            return self._direction(pos_logits, torch.cat(neg_a), self.z_a) + self._direction(
                pos_logits, torch.cat(neg_o), self.z_o
            )

    def _direction(self, pos_logits: Tensor, neg_logits: Tensor, z: Tensor) -> Tensor:
        """One direction's loss; for NCE also refreshes that direction's Z (in place, training mode only)."""
        if self.loss == "infonce":
            return infonce_loss(pos_logits, neg_logits)
        with torch.no_grad():
            scores = torch.cat([pos_logits.unsqueeze(1), neg_logits], dim=1).exp()
            z_batch = self.collective.mean(scores.mean()) * self.num_rows
            if self.training:
                z.copy_(torch.where(z < 0, z_batch, Z_MOMENTUM * z + (1.0 - Z_MOMENTUM) * z_batch))
            z_used = torch.where(z < 0, z_batch, z)
        return nce_loss(pos_logits, neg_logits, z_used, self.num_rows)


class CARLObjective(nn.Module):
    """CARL as an auxiliary loss of the training step, with the paper's schedule (Table 3).

    Before ``bank_start_step`` the step is plain FreeLB; from it on the step computes the clean view and both banks
    are written every step; from ``start_step`` (tau) on L_D joins the last pass with weight 1 (Eq. 6). Before tau
    the clean view only feeds the banks, so the step computes it without a graph.
    """

    name = "carl"

    def __init__(self, loss: CARLLoss, start_step: int, bank_start_step: int) -> None:
        super().__init__()
        if bank_start_step > start_step:
            raise ValueError(f"bank writes (step {bank_start_step}) must start before the loss (step {start_step})")
        self.contrast = loss
        self.start_step = start_step
        self.bank_start_step = bank_start_step

    def wants_clean_view(self, step: int) -> bool:
        return step >= self.bank_start_step

    def clean_view_needs_grad(self, step: int) -> bool:
        return step >= self.start_step

    def loss(self, views: Any, step: int) -> Tensor | None:
        if step < self.start_step:
            return None
        batch = views.batch
        return self.contrast(batch.indices, batch.labels, views.clean.sentence, views.adversarial.sentence)

    def after_backward(self, views: Any, step: int) -> None:
        if step >= self.bank_start_step:
            batch = views.batch
            self.contrast.update_banks(
                batch.indices, views.clean.sentence.detach(), views.adversarial.sentence.detach()
            )
