"""Choosing the device: one free GPU per job, even when a scheduler starts several jobs on one host.

Snakemake's ``--resources gpu=2`` only caps how many GPU jobs run at once; it never sets
``CUDA_VISIBLE_DEVICES``, so two jobs would both use GPU 0. Each job therefore leases a GPU through an
exclusive lock file named after the physical GPU id, and holds it until the process ends.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from carlrar.errors import CarlrarError

log = logging.getLogger(__name__)


@dataclass
class GpuLease:
    """A leased GPU: ``index`` is torch's index among the visible devices; the lock is held while alive."""

    index: int
    physical_id: str
    lock: FileLock

    def release(self) -> None:
        self.lock.release()


def visible_gpu_ids(count: int) -> list[str]:
    """Physical ids of the ``count`` devices torch sees, honouring CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return [str(i) for i in range(count)]
    return [part.strip() for part in visible.split(",")][:count]


def lease_gpu(physical_ids: list[str], lock_dir: str | Path, wait_seconds: float = 0.0, poll: float = 2.0) -> GpuLease:
    """Take the first GPU whose lock is free; wait up to ``wait_seconds`` for one to be released."""
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    while True:
        for index, physical in enumerate(physical_ids):
            lock = FileLock(str(lock_dir / f"gpu-{physical}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            return GpuLease(index=index, physical_id=physical, lock=lock)
        if time.monotonic() >= deadline:
            raise CarlrarError(
                f"all visible GPUs ({', '.join(physical_ids)}) are leased by other carlrar jobs (locks in {lock_dir}); "
                "lower --resources gpu=N or set CUDA_VISIBLE_DEVICES"
            )
        time.sleep(poll)


def default_lock_dir() -> Path:
    return Path(os.environ.get("CARLRAR_GPU_LOCK_DIR", Path(tempfile.gettempdir()) / "carlrar-gpu-locks"))


def select_device(requested: str = "auto", wait_seconds: float = 3600.0) -> tuple[torch.device, GpuLease | None]:
    """``auto``: a leased free GPU when CUDA is available, else the CPU; ``cpu`` or ``cuda:N`` as given."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), None
    if requested.startswith("cuda:"):
        return torch.device(requested), None
    if requested not in ("auto", "cuda"):
        raise CarlrarError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise CarlrarError("device 'cuda' requested but torch sees no GPU (check the CUDA build of torch)")
    lease = lease_gpu(visible_gpu_ids(torch.cuda.device_count()), default_lock_dir(), wait_seconds)
    log.info("leased GPU %s (cuda:%d)", lease.physical_id, lease.index)
    return torch.device(f"cuda:{lease.index}"), lease
