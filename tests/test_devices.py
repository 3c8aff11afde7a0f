"""Choosing the GPU, tested without one: torch's CUDA queries and the UUID lookup are faked.

What the fakes stand for: ``uuids[i]`` is the physical GPU behind torch's visible device ``i`` (None: torch
reports no UUID; ``pcis[i]`` is then its PCI address, None by default). Two "jobs" on a cgroup-confined node both
see ``CUDA_VISIBLE_DEVICES=0`` yet hold different UUIDs; the lock must follow the UUID. A SLURM job is faked by
its variables (``SLURM_JOB_ID`` and the GPU list SLURM sets); the "other job" is another process with its own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import carlrar
from carlrar import devices
from carlrar.cli import DEVICE_HELP, build_parser
from carlrar.devices import gpu_slots, lease_gpu, physical_gpu_ids, select_device, slot_lock_path, visible_gpu_ids
from carlrar.errors import CarlrarError

UUID_A = "1f2e3d4c-aaaa-bbbb-cccc-000000000001"
UUID_B = "9a8b7c6d-aaaa-bbbb-cccc-000000000002"


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private lock folder and an environment free of the host's SLURM, CUDA and carlrar GPU settings."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "CARLRAR_GPU_")) or name == "CUDA_VISIBLE_DEVICES":
            monkeypatch.delenv(name)
    folder = tmp_path / "locks"
    monkeypatch.setenv("CARLRAR_GPU_LOCK_DIR", str(folder))
    return folder


def fake_gpus(monkeypatch: pytest.MonkeyPatch, uuids: list[str | None], pcis: list[str | None] | None = None) -> None:
    """torch sees ``len(uuids)`` GPUs; visible device ``i`` is the physical GPU ``uuids[i]`` at ``pcis[i]``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(uuids))
    monkeypatch.setattr(devices, "gpu_uuid", lambda index: uuids[index])
    monkeypatch.setattr(devices, "gpu_pci_address", lambda index: (pcis or [None] * len(uuids))[index])


HOLDER = textwrap.dedent(
    """
    import sys, torch
    from carlrar import devices
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    devices.gpu_uuid = lambda index: sys.argv[1] or None
    devices.gpu_pci_address = lambda index: None
    device, lease = devices.select_device("auto", wait_seconds=0)
    print(device, lease.physical_id, lease.slot, flush=True)
    sys.stdin.read()  # hold the lease until the test closes our stdin
    """
)


def hold_gpu_in_other_job(uuid: str | None, slot: int = 0, **env: str) -> subprocess.Popen[str]:
    """Another carlrar job (its own process; this environment with ``env`` on top) that leases its device 0, the
    GPU ``uuid`` (None: no UUID readable), and keeps it; it must have got ``slot``."""
    path = os.pathsep.join([str(Path(carlrar.__file__).parents[1]), *sys.path])
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, uuid or ""],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=path, **env),
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().split() == ["cuda:0", uuid or "0", str(slot)]
    return holder


def lock_names(lock_dir: Path) -> list[str]:
    return sorted(path.name for path in lock_dir.iterdir())


def in_slurm_job(monkeypatch: pytest.MonkeyPatch, job: str) -> None:
    """This process runs in SLURM job ``job``, allocated one GPU (node index 3), seen as device 0 (cgroups)."""
    for name, value in {"SLURM_JOB_ID": job, "SLURM_JOB_GPUS": "3", "CUDA_VISIBLE_DEVICES": "0"}.items():
        monkeypatch.setenv(name, value)


def release(holder: subprocess.Popen[str]) -> None:
    holder.communicate(timeout=60)


# --- (a) the lock follows the physical GPU, not the job-relative index --------------------------------------------


def test_jobs_that_both_see_device_0_on_different_gpus_both_get_one(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # what every job sees on a cgroup-confined node
    holder = hold_gpu_in_other_job(UUID_A)
    try:
        fake_gpus(monkeypatch, [UUID_B])
        device, lease = select_device("auto", wait_seconds=0)
        assert (str(device), lease.index, lease.physical_id, lease.slot) == ("cuda:0", 0, UUID_B, 0)
        assert sorted(p.name for p in lock_dir.iterdir()) == [f"gpu-{UUID_A}-slot0.lock", f"gpu-{UUID_B}-slot0.lock"]
        lease.release()
    finally:
        release(holder)


# --- (b) one GPU, one slot: the second job is refused; two slots: both run ----------------------------------------


def test_second_job_on_the_same_gpu_is_refused_with_the_ways_out(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    holder = hold_gpu_in_other_job(UUID_A)
    try:
        fake_gpus(monkeypatch, [UUID_A])
        with pytest.raises(CarlrarError) as refused:
            select_device("auto", wait_seconds=0)
    finally:
        release(holder)
    message = str(refused.value)
    assert "\n" not in message
    assert "cuda:0=1f2e3d4c" in message
    assert f"locks gpu-* in {lock_dir}" in message
    for way_out in ("lower --resources gpu=N", "raise CARLRAR_GPU_SLOTS (now 1)", "CARLRAR_GPU_LEASE=off"):
        assert way_out in message


def test_two_slots_let_two_jobs_share_a_gpu(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARLRAR_GPU_SLOTS", "2")
    fake_gpus(monkeypatch, [UUID_A])
    _, first = select_device("auto", wait_seconds=0)
    _, second = select_device("auto", wait_seconds=0)
    assert [(lease.physical_id, lease.slot) for lease in (first, second)] == [(UUID_A, 0), (UUID_A, 1)]
    with pytest.raises(CarlrarError, match=r"all 2 slot\(s\)"):
        select_device("auto", wait_seconds=0)
    first.release()
    _, third = select_device("auto", wait_seconds=0)
    assert third.slot == 0


def test_lease_held_by_another_process_is_skipped(tmp_path: Path) -> None:
    held = slot_lock_path(tmp_path, "3", 0)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock; "
            f"l = FileLock(r'{held}'); l.acquire(); print('held', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        lease = lease_gpu(["3", "5"], tmp_path)
        assert (lease.index, lease.physical_id, lease.slot) == (1, "5", 0)
    finally:
        holder.kill()
        holder.wait()


# --- (c) inside a SLURM allocation: its own jobs take turns, other SLURM jobs never block them --------------------


@pytest.mark.parametrize("uuid", [UUID_A, None])
def test_two_jobs_in_one_allocation_do_not_share_its_one_gpu(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch, uuid: str | None
) -> None:
    """`snakemake --profile profiles/gpu` inside `salloc --gpus=1`: both jobs see the same SLURM job and GPU."""
    in_slurm_job(monkeypatch, "4242")
    holder = hold_gpu_in_other_job(uuid)
    try:
        fake_gpus(monkeypatch, [uuid])
        with pytest.raises(CarlrarError) as refused:
            select_device("auto", wait_seconds=0)
    finally:
        release(holder)
    assert f"locks slurm-job4242-gpu-* in {lock_dir}" in str(refused.value)
    assert lock_names(lock_dir) == [f"slurm-job4242-gpu-{uuid or '0'}-slot0.lock"]


def test_two_slots_let_two_jobs_of_one_allocation_share_its_gpu(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_slurm_job(monkeypatch, "4242")
    monkeypatch.setenv("CARLRAR_GPU_SLOTS", "2")
    holder = hold_gpu_in_other_job(UUID_A)
    try:
        fake_gpus(monkeypatch, [UUID_A])
        device, lease = select_device("auto", wait_seconds=0)
        assert (str(device), lease.physical_id, lease.slot) == ("cuda:0", UUID_A, 1)
        with pytest.raises(CarlrarError, match=r"all 2 slot\(s\)"):
            select_device("auto", wait_seconds=0)
    finally:
        release(holder)


@pytest.mark.parametrize("uuid", [None, UUID_A])  # no UUID: both see "0"; one UUID: a GPU shared by --gres=shard
def test_separate_slurm_jobs_on_one_node_lease_at_once(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch, uuid: str | None
) -> None:
    """profiles/slurm: each Snakemake job is its own SLURM job; SLURM, not a lock, keeps them apart."""
    in_slurm_job(monkeypatch, "2")
    holder = hold_gpu_in_other_job(uuid, SLURM_JOB_ID="1")
    try:
        fake_gpus(monkeypatch, [uuid])
        device, lease = select_device("auto", wait_seconds=0)
        assert (str(device), lease.physical_id, lease.slot) == ("cuda:0", uuid or "0", 0)
    finally:
        release(holder)
    gpu = uuid or "0"
    assert lock_names(lock_dir) == [f"slurm-job1-gpu-{gpu}-slot0.lock", f"slurm-job2-gpu-{gpu}-slot0.lock"]


def test_lease_on_shares_the_locks_of_separate_slurm_jobs(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CARLRAR_GPU_LEASE=on: for a cluster that does not keep its jobs' GPUs apart, every job on the host counts."""
    in_slurm_job(monkeypatch, "2")
    monkeypatch.setenv("CARLRAR_GPU_LEASE", "on")
    holder = hold_gpu_in_other_job(UUID_A, SLURM_JOB_ID="1")
    try:
        fake_gpus(monkeypatch, [UUID_A])
        with pytest.raises(CarlrarError, match=f"locks gpu-\\* in {lock_dir}"):
            select_device("auto", wait_seconds=0)
    finally:
        release(holder)


# --- (d) which locks a job takes, from its environment --------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "uuids", "lock"),
    [
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_GPUS": "0"}, [UUID_A], f"slurm-job7-gpu-{UUID_A}-slot0.lock"),
        ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "1"}, [UUID_A], f"slurm-job7-gpu-{UUID_A}-slot0.lock"),
        ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0,1"}, [UUID_A, UUID_B], f"slurm-job7-gpu-{UUID_A}-slot0.lock"),
        # no GPUs allocated, or not inside a job: SLURM keeps no GPUs apart, so every job on the host counts
        ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "0"}, [UUID_A], f"gpu-{UUID_A}-slot0.lock"),
        ({"SLURM_JOB_GPUS": "0"}, [UUID_A], f"gpu-{UUID_A}-slot0.lock"),
        ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0", "CARLRAR_GPU_LEASE": "on"}, [UUID_A], f"gpu-{UUID_A}-slot0.lock"),
        ({"CARLRAR_GPU_LEASE": "AUTO"}, [UUID_A], f"gpu-{UUID_A}-slot0.lock"),
        ({"CARLRAR_GPU_LEASE": "off"}, [UUID_A, UUID_B], None),
        ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0", "CARLRAR_GPU_LEASE": "off"}, [UUID_A], None),
    ],
)
def test_which_lock_a_job_takes(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], uuids: list[str], lock: str | None
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fake_gpus(monkeypatch, uuids)
    device, lease = select_device("auto", wait_seconds=0)
    assert str(device) == "cuda:0"
    assert (Path(lease.lock.lock_file).name if lease else None) == lock
    assert lock_dir.exists() == (lock is not None)


def test_isolated_jobs_without_uuid_are_told_apart_by_pci_address(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside SLURM (two containers given one lock folder), the PCI address names a GPU that has no UUID."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    fake_gpus(monkeypatch, [None], pcis=["pci-0000-3b-00"])
    _, first = select_device("auto", wait_seconds=0)
    fake_gpus(monkeypatch, [None], pcis=["pci-0000-86-00"])
    _, second = select_device("auto", wait_seconds=0)
    assert (first.physical_id, second.physical_id) == ("pci-0000-3b-00", "pci-0000-86-00")
    with pytest.raises(CarlrarError, match="all 1 slot"):
        select_device("auto", wait_seconds=0)  # the same GPU as the second job


def test_lease_off_ignores_a_taken_gpu(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, [UUID_A])
    _, held = select_device("auto", wait_seconds=0)
    monkeypatch.setenv("CARLRAR_GPU_LEASE", "off")
    assert select_device("cuda", wait_seconds=0) == (torch.device("cuda:0"), None)
    held.release()


def test_bad_lease_mode_is_one_line(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARLRAR_GPU_LEASE", "no")
    fake_gpus(monkeypatch, [UUID_A])
    with pytest.raises(CarlrarError, match=r"^CARLRAR_GPU_LEASE='no' is invalid: use auto, on, off$"):
        select_device("auto", wait_seconds=0)


# --- (e) spread jobs over GPUs before doubling up -----------------------------------------------------------------


def test_slots_spread_jobs_across_gpus_first(tmp_path: Path) -> None:
    leases = [lease_gpu([UUID_A, UUID_B], tmp_path, slots=2) for _ in range(4)]
    assert [(lease.index, lease.slot) for lease in leases] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    with pytest.raises(CarlrarError, match="all 2 slot"):
        lease_gpu([UUID_A, UUID_B], tmp_path, slots=2, wait_seconds=0)
    leases[3].release()  # GPU B now has the only free slot
    again = lease_gpu([UUID_A, UUID_B], tmp_path, slots=2)
    assert (again.index, again.physical_id, again.slot) == (1, UUID_B, 1)


def test_select_device_spreads_over_fake_gpus(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARLRAR_GPU_SLOTS", "2")
    fake_gpus(monkeypatch, [UUID_A, UUID_B])
    chosen = [select_device("auto", wait_seconds=0) for _ in range(2)]
    assert [(str(device), lease.physical_id) for device, lease in chosen] == [("cuda:0", UUID_A), ("cuda:1", UUID_B)]


def test_single_slot_gpus_go_one_job_each(tmp_path: Path) -> None:
    first = lease_gpu(["0", "1"], tmp_path)
    second = lease_gpu(["0", "1"], tmp_path)
    assert (first.index, second.index) == (0, 1)
    with pytest.raises(CarlrarError, match="all 1 slot"):
        lease_gpu(["0", "1"], tmp_path, wait_seconds=0)
    first.release()
    assert lease_gpu(["0", "1"], tmp_path).physical_id == "0"


# --- (f) CARLRAR_GPU_SLOTS must be a positive integer -------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "", " "])
def test_bad_slot_counts_are_refused_in_one_line(value: str) -> None:
    with pytest.raises(CarlrarError) as refused:
        gpu_slots({"CARLRAR_GPU_SLOTS": value})
    assert str(refused.value) == (
        f"CARLRAR_GPU_SLOTS={value.strip()!r} is invalid: use a positive integer (1, 2, ...: runs per GPU)"
    )


def test_slot_counts(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert gpu_slots({}) == 1
    assert gpu_slots({"CARLRAR_GPU_SLOTS": " 3 "}) == 3
    monkeypatch.setenv("CARLRAR_GPU_SLOTS", "0")
    fake_gpus(monkeypatch, [UUID_A])
    with pytest.raises(CarlrarError, match="CARLRAR_GPU_SLOTS='0'"):
        select_device("auto", wait_seconds=0)


# --- naming the physical GPU --------------------------------------------------------------------------------------


class FakeProperties:
    def __init__(self, uuid: str) -> None:
        self.uuid = uuid


@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        ("GPU-1F2E3D4C-aaaa-bbbb-cccc-000000000001", UUID_A),
        (UUID_B, UUID_B),
        ("00000000-0000-0000-0000-000000000000", None),  # what a backend without UUIDs reports
    ],
)
def test_gpu_uuid_normalises_torchs_answer(
    monkeypatch: pytest.MonkeyPatch, reported: str, expected: str | None
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: FakeProperties(reported))
    assert devices.gpu_uuid(0) == expected


def test_gpu_uuid_is_none_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cuda(index: int) -> None:
        raise RuntimeError("no CUDA GPUs are available")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_cuda)
    assert devices.gpu_uuid(0) is None


def test_visible_entry_names_a_gpu_without_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert physical_gpu_ids(2, lambda index: [None, UUID_B][index], lambda index: None) == ["2", UUID_B]
    assert slot_lock_path(Path("/locks"), "MIG-GPU/1/2", 3) == Path("/locks/gpu-MIG-GPU_1_2-slot3.lock")


def test_gpu_names_prefer_uuid_then_id_entry_then_pci_then_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-7a1c,GPU-55aa,3,4")
    uuids = [None, UUID_A, None, None]
    pcis = ["pci-0000-3b-00", "pci-0000-3c-00", "pci-0000-3d-00", None]
    ids = physical_gpu_ids(4, lambda index: uuids[index], lambda index: pcis[index])
    assert ids == ["MIG-7a1c", UUID_A, "pci-0000-3d-00", "4"]


class FakePciProperties:
    pci_domain_id, pci_bus_id, pci_device_id = 0, 0x3B, 0


def test_gpu_pci_address_formats_torchs_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: FakePciProperties())
    assert devices.gpu_pci_address(0) == "pci-0000-3b-00"
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: FakeProperties(UUID_A))
    assert devices.gpu_pci_address(0) is None  # a torch without PCI fields


def test_visible_devices_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpu_ids(2) == ["2", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpu_ids(3) == ["0", "1", "2"]


def test_explicit_devices_take_no_lease(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, [UUID_A, UUID_B])
    assert select_device("cuda:1") == (torch.device("cuda:1"), None)
    assert select_device("cpu") == (torch.device("cpu"), None)
    with pytest.raises(CarlrarError, match="unknown device 'gpu'"):
        select_device("gpu")
    assert not lock_dir.exists()


def test_a_numbered_gpu_that_does_not_exist_is_refused_before_any_work(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.device("cuda:9") is accepted by torch and fails only at the first tensor moved there."""
    fake_gpus(monkeypatch, [UUID_A, UUID_B])
    with pytest.raises(CarlrarError, match=r"device 'cuda:2' does not exist: torch sees 2 GPU\(s\), cuda:0 to cuda:1"):
        select_device("cuda:2")
    with pytest.raises(CarlrarError, match=r"unknown device 'cuda:-1'"):
        select_device("cuda:-1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(CarlrarError, match=r"device 'cuda:0' requested but this torch is a CPU-only build; use --dev"):
        select_device("cuda:0")
    assert not lock_dir.exists()


# --- the CLI tells users about the variables, the same way on every command ---------------------------------------


def test_every_device_option_has_the_same_help_naming_the_variables() -> None:
    def device_helps(parser: argparse.ArgumentParser) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for action in parser._actions:
            if "--device" in action.option_strings:
                found[parser.prog] = action.help
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found |= device_helps(sub)
        return found

    helps = device_helps(build_parser())
    assert sorted(prog.split()[-1] for prog in helps) == ["attack", "rar-warmup", "samples", "train"]
    assert set(helps.values()) == {DEVICE_HELP}
    assert devices.SLOTS_ENV in DEVICE_HELP and devices.LEASE_ENV in DEVICE_HELP
