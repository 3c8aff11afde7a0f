"""Choosing the device: a GPU slot per job, even when a scheduler starts several jobs on one host.

Why leases: Snakemake's ``--resources gpu=2`` only caps how many GPU jobs run at once; it never sets
``CUDA_VISIBLE_DEVICES``, so two jobs would both use GPU 0. Each job therefore leases a GPU through an exclusive
lock file and holds it until the process ends (the OS drops the lock when the process dies, so none go stale).

Why the physical GPU names the lock: a ``CUDA_VISIBLE_DEVICES`` entry is relative to the job. On a SLURM node
with cgroup device confinement every job sees its own GPU as ``0``; locks named after ``0`` made the second job
on a node wait for a GPU that nobody else could even see. The GPU's UUID is the same in every job, cgroup and
container that sees that GPU, so two jobs share a lock exactly when they share the hardware. The entry is the
fallback only where no UUID can be read.

Why slots: one small run (MiniLM, ALBERT) leaves a large GPU mostly idle. ``CARLRAR_GPU_SLOTS=S`` gives each GPU
S lock files, so S runs share it; a job takes a slot on the GPU with the most free slots, which spreads jobs
across GPUs before doubling any up.

Why no lease under a scheduler that isolates devices: a SLURM job that was allocated GPUs sees only devices the
scheduler gave it, so a lock adds no safety. It can only do harm: with GPU sharding (``--gres=shard``) or MPS
SLURM places several jobs on one GPU on purpose, and a lock would serialise them; with a job-private ``/tmp``
the locks are not even shared. Such a job uses ``cuda:0`` without a lock when it sees exactly one GPU. When it
sees several (e.g. a local ``snakemake --resources gpu=4`` inside one ``salloc --gpus=4``), its own carlrar
jobs still have to be spread over them, so it leases as on a workstation; UUID keys keep those locks from
clashing with other SLURM jobs on the node.

Environment:

- ``CARLRAR_GPU_LEASE``: ``auto`` (default: lease unless a SLURM job with one allocated GPU), ``on`` (always
  lease), ``off`` (never lease: use ``cuda:0``; for other schedulers that isolate devices).
- ``CARLRAR_GPU_SLOTS``: concurrent carlrar runs per GPU, a positive integer (default 1).
- ``CARLRAR_GPU_LOCK_DIR``: folder of the lock files (default ``<tmp>/carlrar-gpu-locks``); every job on a host
  must see the same folder, and a local disk is safest (file locks over NFS are unreliable).

Slots are advisory: they keep carlrar runs apart, not other programs, and they do not measure memory; choose S
so that S runs fit in one GPU's memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from carlrar.errors import CarlrarError

log = logging.getLogger(__name__)

LEASE_ENV = "CARLRAR_GPU_LEASE"
SLOTS_ENV = "CARLRAR_GPU_SLOTS"
LOCK_DIR_ENV = "CARLRAR_GPU_LOCK_DIR"
LEASE_MODES = ("auto", "on", "off")
# Set by SLURM in a job (or step) that was allocated GPUs through --gpus / --gres: the first two list the GPUs'
# indices ("0" is GPU 0), the last counts them ("0" is none).
SLURM_GPU_LISTS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
SLURM_GPU_COUNT = "SLURM_GPUS_ON_NODE"


@dataclass
class GpuLease:
    """A leased GPU slot: ``index`` is torch's index among the visible devices; the lock is held while alive."""

    index: int
    physical_id: str
    slot: int
    lock: FileLock

    def release(self) -> None:
        self.lock.release()


def visible_gpu_ids(count: int) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` entries of the ``count`` devices torch sees (indices, UUIDs or MIG ids)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return [str(i) for i in range(count)]
    return [part.strip() for part in visible.split(",")][:count]


def gpu_uuid(index: int) -> str | None:
    """The UUID of torch's visible device ``index``, or None where torch cannot tell (old driver, other backend).

    Module-level and tiny so that tests replace it: it is the only place that asks the hardware who it is.
    """
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid).strip()
    except (AttributeError, RuntimeError, AssertionError):
        return None
    uuid = uuid.removeprefix("GPU-").lower()
    return uuid if uuid.strip("0-") else None


def physical_gpu_ids(count: int, uuid_of: Callable[[int], str | None] | None = None) -> list[str]:
    """A name per visible device that is the same in every job seeing that GPU: its UUID, else its visible entry."""
    uuid_of = uuid_of or gpu_uuid
    entries = visible_gpu_ids(count)
    entries += [str(i) for i in range(len(entries), count)]
    ids = []
    for index, entry in enumerate(entries):
        uuid = uuid_of(index)
        if uuid is None:
            log.info("no UUID for cuda:%d; its lock is named after CUDA_VISIBLE_DEVICES entry %r", index, entry)
        ids.append(uuid or entry)
    return ids


def gpu_slots(environ: Mapping[str, str] | None = None) -> int:
    """``CARLRAR_GPU_SLOTS``: how many carlrar runs may share one GPU (default 1)."""
    raw = (os.environ if environ is None else environ).get(SLOTS_ENV, "1").strip()
    if not raw.isdigit() or int(raw) < 1:
        raise CarlrarError(f"{SLOTS_ENV}={raw!r} is invalid: use a positive integer (1, 2, ...: runs per GPU)")
    return int(raw)


def lease_mode(environ: Mapping[str, str] | None = None) -> str:
    """``CARLRAR_GPU_LEASE``: auto, on or off (default auto)."""
    mode = (os.environ if environ is None else environ).get(LEASE_ENV, "auto").strip().lower() or "auto"
    if mode not in LEASE_MODES:
        raise CarlrarError(f"{LEASE_ENV}={mode!r} is invalid: use {', '.join(LEASE_MODES)}")
    return mode


def slurm_gpu_job(environ: Mapping[str, str] | None = None) -> str | None:
    """The SLURM job id when this process runs in a SLURM job that was allocated GPUs, else None."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID", "").strip()
    listed = any(env.get(name, "").strip() for name in SLURM_GPU_LISTS)
    counted = env.get(SLURM_GPU_COUNT, "").strip() not in ("", "0")
    return job if job and (listed or counted) else None


def lease_reason(visible_count: int, environ: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """Whether to lease a GPU here, and why (logged, so a user can see which rule applied)."""
    mode = lease_mode(environ)
    if mode != "auto":
        return mode == "on", f"{LEASE_ENV}={mode}"
    job = slurm_gpu_job(environ)
    if job is None:
        return True, "no scheduler isolates the GPUs"
    if visible_count == 1:
        return False, f"SLURM job {job} was allocated this GPU"
    return True, f"SLURM job {job} sees {visible_count} GPUs, which its own jobs share"


def slot_lock_path(lock_dir: Path, physical_id: str, slot: int) -> Path:
    """``gpu-<id>-slot<k>.lock``, with characters a file name should not hold replaced."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", physical_id)
    return lock_dir / f"gpu-{safe}-slot{slot}.lock"


def short_id(physical_id: str) -> str:
    """A UUID's first 8 characters, enough to tell GPUs apart in a message; short ids as they are."""
    return physical_id[:8] if len(physical_id) > 12 else physical_id


def _grab_free_slots(physical_ids: list[str], lock_dir: Path, slots: int) -> list[list[tuple[int, FileLock]]]:
    """Acquire every free slot (briefly): the locks themselves are the only true count of free slots."""
    held: list[list[tuple[int, FileLock]]] = []
    for physical in physical_ids:
        mine = []
        for slot in range(slots):
            lock = FileLock(str(slot_lock_path(lock_dir, physical, slot)))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            mine.append((slot, lock))
        held.append(mine)
    return held


def _busy_message(physical_ids: list[str], lock_dir: Path, slots: int, wait_seconds: float) -> str:
    gpus = ", ".join(f"cuda:{i}={short_id(p)}" for i, p in enumerate(physical_ids))
    return (
        f"all {slots} slot(s) of each visible GPU ({gpus}) are leased by other carlrar jobs (locks in {lock_dir}; "
        f"waited {wait_seconds:g} s); lower --resources gpu=N, raise {SLOTS_ENV} (now {slots}) to share a GPU, "
        f"or set {LEASE_ENV}=off where a scheduler already gives each job its own GPU"
    )


def lease_gpu(
    physical_ids: list[str], lock_dir: str | Path, wait_seconds: float = 0.0, poll: float = 2.0, slots: int = 1
) -> GpuLease:
    """Take a free slot on the GPU with the most free slots (lowest index on ties); wait up to ``wait_seconds``.

    Free slots are counted by acquiring them, then all but the chosen one are released: a count from probing
    and releasing could be stale by the time the slot is taken.
    """
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    while True:
        held = _grab_free_slots(physical_ids, lock_dir, slots)
        if any(held):
            index = max(range(len(held)), key=lambda i: (len(held[i]), -i))
            slot, lock = held[index][0]
            for _, other in (pair for mine in held for pair in mine):
                if other is not lock:
                    other.release()
            return GpuLease(index=index, physical_id=physical_ids[index], slot=slot, lock=lock)
        if time.monotonic() >= deadline:
            raise CarlrarError(_busy_message(physical_ids, lock_dir, slots, wait_seconds))
        time.sleep(poll)


def default_lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV, Path(tempfile.gettempdir()) / "carlrar-gpu-locks"))


def numbered_gpu(requested: str) -> torch.device:
    """``cuda:N`` as a device, refused in one line before any work where it does not exist (torch would accept the
    name and fail at the first tensor moved there, with a traceback)."""
    index = requested.removeprefix("cuda:")
    if not index.isdigit():
        raise CarlrarError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no GPU"
        raise CarlrarError(f"device {requested!r} requested but {why}; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if int(index) >= count:
        raise CarlrarError(
            f"device {requested!r} does not exist: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1} "
            "(after CUDA_VISIBLE_DEVICES); use one of them, or cuda / auto for a free one"
        )
    return torch.device(requested)


def select_device(requested: str = "auto", wait_seconds: float = 3600.0) -> tuple[torch.device, GpuLease | None]:
    """``auto``/``cuda``: a leased GPU slot (or cuda:0 where no lease is needed), ``auto`` falling back to the CPU;
    ``cpu`` or ``cuda:N`` as given, without a lease."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), None
    if requested.startswith("cuda:"):
        return numbered_gpu(requested), None
    if requested not in ("auto", "cuda"):
        raise CarlrarError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise CarlrarError("device 'cuda' requested but torch sees no GPU (check the CUDA build of torch)")
    slots = gpu_slots()
    count = torch.cuda.device_count()
    lease_it, reason = lease_reason(count)
    if not lease_it:
        log.info("using cuda:0 without a GPU lease: %s", reason)
        return torch.device("cuda:0"), None
    lock_dir = default_lock_dir()
    lease = lease_gpu(physical_gpu_ids(count), lock_dir, wait_seconds, slots=slots)
    log.info(
        "leased GPU %s slot %d of %d as cuda:%d (%s; locks in %s)",
        lease.physical_id,
        lease.slot,
        slots,
        lease.index,
        reason,
        lock_dir,
    )
    return torch.device(f"cuda:{lease.index}"), lease


@contextlib.contextmanager
def leased_device(requested: str = "auto") -> Iterator[torch.device]:
    """``select_device`` for the length of a ``with`` block: a leased GPU slot is released however the block ends."""
    device, lease = select_device(requested)
    try:
        yield device
    finally:
        if lease is not None:
            lease.release()
