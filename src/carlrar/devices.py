"""Choosing the device: a GPU slot per job, even when a scheduler starts several jobs on one host.

Why leases: Snakemake's ``--resources gpu=2`` only caps how many GPU jobs run at once; it never sets
``CUDA_VISIBLE_DEVICES``, so two jobs would both use GPU 0. Each job therefore leases a GPU through an exclusive
lock file and holds it until the process ends (the OS drops the lock when the process dies, so none go stale).

Why slots: one small run (MiniLM, ALBERT) leaves a large GPU mostly idle. ``CARLRAR_GPU_SLOTS=S`` gives each GPU
S lock files, so S runs share it; a job takes a slot on the GPU with the most free slots, which spreads jobs
across GPUs before doubling any up.

Why the physical GPU names the lock: a ``CUDA_VISIBLE_DEVICES`` entry is relative to the job. On a node with
cgroup device confinement every job sees its own GPU as ``0``; locks named after ``0`` made the second job on a
node wait for a GPU that nobody else could even see. A GPU is named, in this order, by its UUID; by a visible
entry that is itself an id (``GPU-...``, ``MIG-...``); by its PCI address; and only then by the job-relative
index. The first three are the same in every job, cgroup and container that sees the GPU, so two jobs share a
lock exactly when they share the hardware.

Why a SLURM job's locks are its own: SLURM keeps separate jobs apart itself (each gets its own GPUs, or shares
one on purpose through ``--gres=shard`` or MPS, where a common lock would only serialise them). What SLURM does
not keep apart is several carlrar processes inside one job: a local ``snakemake --profile profiles/gpu`` run
inside ``salloc --gpus=1``, or a Snakemake group job, starts them all under the same ``SLURM_JOB_ID``. So inside
a SLURM job that was allocated GPUs every job leases, and its lock names start with that job id: the jobs of one
allocation take turns by ``gpu_slots`` on its GPUs, and two SLURM jobs never block each other, even where no
UUID or PCI address can be read and both see their GPU as ``0``. (``profiles/slurm`` submits each Snakemake job
as its own SLURM job: the lease is then always free and costs one lock file.) An earlier rule skipped the lease
in a SLURM job that sees one GPU; it let all the jobs of a one-GPU allocation run on ``cuda:0`` at once.

Limits: the index is the last resort; two jobs confined to different GPUs that report no UUID, no id entry and
no PCI address still block each other where they share a lock scope (two containers given one lock folder, or
two ``srun`` steps of one SLURM job, each confined to its own GPU): give each its own ``CARLRAR_GPU_LOCK_DIR``
or set ``CARLRAR_GPU_LEASE=off``. Slots are advisory: they keep carlrar
runs apart, not other programs, and they do not measure memory; choose S so that S runs fit in one GPU's memory.

Environment:

- ``CARLRAR_GPU_LEASE``: ``auto`` (default: lease; inside a SLURM job that was allocated GPUs the locks are
  private to that job), ``on`` (lease with host-wide locks even inside a SLURM job: for a cluster that does not
  keep its jobs' GPUs apart), ``off`` (never lease: use ``cuda:0``; for other schedulers that give each job its
  own GPU).
- ``CARLRAR_GPU_SLOTS``: concurrent carlrar runs per GPU, a positive integer (default 1).
- ``CARLRAR_GPU_LOCK_DIR``: folder of the lock files (default ``<tmp>/carlrar-gpu-locks``); every job on a host
  (every job of one SLURM allocation, at the least) must see the same folder, and a local disk is safest (file
  locks over NFS are unreliable).
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


def gpu_pci_address(index: int) -> str | None:
    """The PCI address of torch's visible device ``index`` (``pci-<domain>-<bus>-<device>``), or None.

    Host-wide like a UUID (every job and container on the host sees the same address), so it names a GPU whose
    UUID cannot be read. Module-level and tiny so that tests replace it, as ``gpu_uuid``.
    """
    try:
        props = torch.cuda.get_device_properties(index)
        return f"pci-{props.pci_domain_id:04x}-{props.pci_bus_id:02x}-{props.pci_device_id:02x}"
    except (AttributeError, RuntimeError, AssertionError, TypeError, ValueError):
        return None


def physical_gpu_ids(
    count: int,
    uuid_of: Callable[[int], str | None] | None = None,
    pci_of: Callable[[int], str | None] | None = None,
) -> list[str]:
    """A name per visible device that is the same in every job seeing that GPU (see the module docstring).

    In order: the UUID; a visible entry that is an id itself (``GPU-...``, ``MIG-...``: MIG instances share a PCI
    address, so it comes first); the PCI address; the job-relative index as the last resort.
    """
    uuid_of, pci_of = uuid_of or gpu_uuid, pci_of or gpu_pci_address
    entries = visible_gpu_ids(count)
    entries += [str(i) for i in range(len(entries), count)]
    ids = []
    for index, entry in enumerate(entries):
        named = uuid_of(index) or (None if entry.isdigit() else entry) or pci_of(index)
        if named is None:
            log.info("no UUID or PCI address for cuda:%d; its lock is named after its index %r", index, entry)
        ids.append(named or entry)
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


@dataclass(frozen=True)
class LeasePlan:
    """Whether to lease; ``scope``, the prefix of the lock names ("" host-wide); and why (logged)."""

    lease: bool
    scope: str
    reason: str


def lease_plan(environ: Mapping[str, str] | None = None) -> LeasePlan:
    """Lease or not, and whose locks count: the host's, or only those of this SLURM job (module docstring)."""
    mode = lease_mode(environ)
    if mode == "off":
        return LeasePlan(False, "", f"{LEASE_ENV}=off")
    if mode == "on":
        return LeasePlan(True, "", f"{LEASE_ENV}=on: locks shared by every job on the host")
    job = slurm_gpu_job(environ)
    if job is None:
        return LeasePlan(True, "", "no scheduler isolates the GPUs: locks shared by every job on the host")
    return LeasePlan(True, f"slurm-job{job}", f"locks private to SLURM job {job}, whose own jobs share its GPUs")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _lock_prefix(scope: str) -> str:
    return f"{_safe(scope)}-gpu-" if scope else "gpu-"


def slot_lock_path(lock_dir: Path, physical_id: str, slot: int, scope: str = "") -> Path:
    """``[<scope>-]gpu-<id>-slot<k>.lock``, with characters a file name should not hold replaced."""
    return lock_dir / f"{_lock_prefix(scope)}{_safe(physical_id)}-slot{slot}.lock"


def short_id(physical_id: str) -> str:
    """A UUID's first 8 characters, enough to tell GPUs apart in a message; short ids as they are."""
    return physical_id[:8] if len(physical_id) > 12 else physical_id


def _grab_free_slots(
    physical_ids: list[str], lock_dir: Path, slots: int, scope: str
) -> list[list[tuple[int, FileLock]]]:
    """Acquire every free slot (briefly): the locks themselves are the only true count of free slots."""
    held: list[list[tuple[int, FileLock]]] = []
    for physical in physical_ids:
        mine = []
        for slot in range(slots):
            lock = FileLock(str(slot_lock_path(lock_dir, physical, slot, scope)))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            mine.append((slot, lock))
        held.append(mine)
    return held


def _busy_message(physical_ids: list[str], lock_dir: Path, slots: int, wait_seconds: float, scope: str) -> str:
    gpus = ", ".join(f"cuda:{i}={short_id(p)}" for i, p in enumerate(physical_ids))
    return (
        f"all {slots} slot(s) of each visible GPU ({gpus}) are leased by other carlrar jobs (locks "
        f"{_lock_prefix(scope)}* in {lock_dir}; waited {wait_seconds:g} s); lower --resources gpu=N, raise "
        f"{SLOTS_ENV} (now {slots}) to share a GPU, or set {LEASE_ENV}=off where a scheduler already gives each "
        "job its own GPU"
    )


def lease_gpu(
    physical_ids: list[str],
    lock_dir: str | Path,
    wait_seconds: float = 0.0,
    poll: float = 2.0,
    slots: int = 1,
    scope: str = "",
) -> GpuLease:
    """Take a free slot on the GPU with the most free slots (lowest index on ties); wait up to ``wait_seconds``.

    Only locks of the same ``scope`` compete. Free slots are counted by acquiring them, then all but the chosen
    one are released: a count from probing and releasing could be stale by the time the slot is taken.
    """
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    while True:
        held = _grab_free_slots(physical_ids, lock_dir, slots, scope)
        if any(held):
            index = max(range(len(held)), key=lambda i: (len(held[i]), -i))
            slot, lock = held[index][0]
            for _, other in (pair for mine in held for pair in mine):
                if other is not lock:
                    other.release()
            return GpuLease(index=index, physical_id=physical_ids[index], slot=slot, lock=lock)
        if time.monotonic() >= deadline:
            raise CarlrarError(_busy_message(physical_ids, lock_dir, slots, wait_seconds, scope))
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
    plan = lease_plan()
    if not plan.lease:
        log.info("using cuda:0 without a GPU lease: %s", plan.reason)
        return torch.device("cuda:0"), None
    lock_dir = default_lock_dir()
    ids = physical_gpu_ids(torch.cuda.device_count())
    lease = lease_gpu(ids, lock_dir, wait_seconds, slots=slots, scope=plan.scope)
    log.info(
        "leased GPU %s slot %d of %d as cuda:%d (%s; locks in %s)",
        lease.physical_id,
        lease.slot,
        slots,
        lease.index,
        plan.reason,
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
