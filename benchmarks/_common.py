"""Helpers the benchmark scripts share: a timed call, device synchronisation, CARL banks filled as after training.

Imported by bare name (``from _common import ...``): the scripts run as ``python benchmarks/<script>.py``, which puts
this folder on ``sys.path``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from carlrar.contrastive import CARLLoss

SST2_ROWS = 67_349  # rows of SST-2's training set
SST2_POSITIVE = 37_569 / SST2_ROWS  # share of label 1 in SST-2's training set

T = TypeVar("T")


def sync(device: torch.device) -> None:
    """Wait for the GPU: CUDA calls return before the work is done, so a timer needs this on both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Wall-clock and process-CPU seconds of one call; a CPU time near the wall time means no waiting for load."""

    wall_s: float
    cpu_s: float


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, Timing]:
    """Run ``fn`` once between two synchronisations and time it."""
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return result, Timing(time.perf_counter() - start, time.process_time() - start_cpu)


def fill_banks(loss: CARLLoss, seed: int) -> None:
    """Write a random representation into every bank row, as the bank-writing epoch leaves them before tau.

    A timing or a check of L_D needs full banks; filling them through training would take an epoch. Rows are drawn
    on the banks' device from their own generator, so the global RNG (dropout, FreeLB noise) is left untouched.
    """
    device = loss.bank_orig.rows.device
    generator = torch.Generator(device=device).manual_seed(seed)
    dim = loss.bank_orig.rows.shape[1]
    for first in range(0, loss.num_rows, 8192):
        rows = torch.arange(first, min(first + 8192, loss.num_rows), device=device)
        feats = torch.randn(2, len(rows), dim, generator=generator, device=device)
        loss.update_banks(rows, feats[0], feats[1])


def prefilled_carl(labels: Tensor, dim: int, negatives: int, device: torch.device, seed: int) -> CARLLoss:
    """A CARL loss whose banks hold a (random) representation of every row, as after the bank-writing epoch."""
    loss = CARLLoss(labels, dim, negatives, seed=seed).to(device)
    fill_banks(loss, seed)
    return loss
