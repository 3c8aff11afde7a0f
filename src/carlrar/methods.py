"""The training methods (base, FreeLB, CARL, RAR, CARL+RAR) as one perturber plus auxiliary losses (SPEC 6, 8).

``carlrar.registry`` says which regularisers a method adds; ``build_method`` turns that into the objects the
training step calls, with each dataset's FreeLB values and CARL schedule from the config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import Tensor, nn

from carlrar.adversary import (
    AuxiliaryLoss,
    FreeLB,
)
from carlrar.config import Config
from carlrar.contrastive import CARLLoss, CARLObjective
from carlrar.distributed import Collective
from carlrar.errors import CarlrarError
from carlrar.models import TextClassifier
from carlrar.reconstruction import (
    RARObjective,
    build_reconstructor,
)
from carlrar.registry import METHODS

log = logging.getLogger(__name__)


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
    kind = METHODS[name]
    freelb = FreeLB(ds.freelb) if kind.adversarial else None
    auxiliaries: list[AuxiliaryLoss] = []
    if kind.contrastive:
        tau, bank_start = carl_schedule(ds.carl.start_step, ds.carl.start_epoch, steps_per_epoch)
        carl = config.carl
        try:
            loss = CARLLoss(
                train_labels,
                model.config.hidden_size,
                ds.carl.negatives,
                temperature=carl.temperature,
                momentum=carl.momentum,
                loss=carl.loss,
                seed=seed,
                collective=collective,
            )
        except ValueError as exc:
            raise CarlrarError(f"CARL on {dataset}: {exc}") from None
        auxiliaries.append(CARLObjective(loss, start_step=tau, bank_start_step=bank_start))
    if kind.reconstruction:
        reconstructor = build_reconstructor(model, config.model["name"])
        auxiliaries.append(RARObjective(reconstructor, weight=config.rar.weight))
    return Method(name, freelb, auxiliaries)
