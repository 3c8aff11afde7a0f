"""Choosing the GPU, tested without one: torch's CUDA queries and the UUID lookup are faked.

What the fakes stand for: ``uuids[i]`` is the physical GPU behind torch's visible device ``i``. Two "jobs" on a
cgroup-confined node both see ``CUDA_VISIBLE_DEVICES=0`` yet hold different UUIDs; the lock must follow the UUID.
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


def fake_gpus(monkeypatch: pytest.MonkeyPatch, uuids: list[str | None]) -> None:
    """torch sees ``len(uuids)`` GPUs; visible device ``i`` is the physical GPU ``uuids[i]``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(uuids))
    monkeypatch.setattr(devices, "gpu_uuid", lambda index: uuids[index])


HOLDER = textwrap.dedent(
    """
    import sys, torch
    from carlrar import devices
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    devices.gpu_uuid = lambda index: sys.argv[1]
    device, lease = devices.select_device("auto", wait_seconds=0)
    print(device, lease.physical_id, lease.slot, flush=True)
    sys.stdin.read()  # hold the lease until the test closes our stdin
    """
)


def hold_gpu_in_other_job(uuid: str) -> subprocess.Popen[str]:
    """Another carlrar job (its own process, same environment) that leases the GPU ``uuid`` and keeps it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(carlrar.__file__).parents[1]), *sys.path]))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, uuid], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().split() == ["cuda:0", uuid, "0"]
    return holder


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
    assert f"locks in {lock_dir}" in message
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


# --- (c, d) no lock where the scheduler isolates devices, or where the user says so -------------------------------


def test_slurm_job_with_its_own_gpu_takes_no_lock(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_GPUS", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    fake_gpus(monkeypatch, [UUID_A])
    assert [(str(d), lease) for d, lease in [select_device("auto", wait_seconds=0) for _ in range(3)]] == [
        ("cuda:0", None)
    ] * 3
    assert not lock_dir.exists()


@pytest.mark.parametrize(
    ("slurm", "uuids", "leases"),
    [
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_GPUS": "0"}, [UUID_A], False),
        ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "1"}, [UUID_A], False),
        ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "0"}, [UUID_A], True),  # no GPUs allocated: nothing isolates
        ({"SLURM_JOB_GPUS": "0"}, [UUID_A], True),  # not inside a job
        ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0,1"}, [UUID_A, UUID_B], True),  # the job's own jobs share 2 GPUs
        ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0", "CARLRAR_GPU_LEASE": "on"}, [UUID_A], True),
        ({"CARLRAR_GPU_LEASE": "off"}, [UUID_A, UUID_B], False),
        ({"CARLRAR_GPU_LEASE": "AUTO"}, [UUID_A], True),
    ],
)
def test_when_a_lease_is_taken(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch, slurm: dict[str, str], uuids: list[str], leases: bool
) -> None:
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    fake_gpus(monkeypatch, uuids)
    device, lease = select_device("auto", wait_seconds=0)
    assert str(device) == "cuda:0"
    assert (lease is not None) == leases
    assert lock_dir.exists() == leases


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
    assert physical_gpu_ids(2, lambda index: [None, UUID_B][index]) == ["2", UUID_B]
    assert slot_lock_path(Path("/locks"), "MIG-GPU/1/2", 3) == Path("/locks/gpu-MIG-GPU_1_2-slot3.lock")


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
