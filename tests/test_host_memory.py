"""carlrar.host_memory: freed host memory stays in the process (no page faults for reused blocks), opt-out, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from carlrar.errors import CarlrarError
from carlrar.host_memory import ENV, keep_host_memory

ROOT = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION"), reason="mallopt is glibc's")

# Each round allocates, writes and frees blocks above glibc's largest mmap threshold (32 MiB), as a training step does
# with its activations and gradients, and counts the minor page faults it took.
PROBE = """
import json, resource, torch
from carlrar.host_memory import keep_host_memory
kept = keep_host_memory()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(2**18 * mib).fill_(1.0) for mib in (40, 48, 56)]  # float32: 1 MiB per 2**18
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def probe(mode: str) -> dict:
    env = {**os.environ, ENV: mode, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_kept_memory_is_reused_without_page_faults() -> None:
    kept, released = probe("keep"), probe("release")
    pages = (40 + 48 + 56) * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert kept["kept"] is True and released["kept"] is False
    last = slice(-3, None)  # the heap has settled by then
    assert all(f >= pages // 2 for f in released["faults"][last]), released  # glibc's default: fresh pages each round
    assert min(kept["faults"][last]) < pages // 50, kept  # kept: the freed blocks are reused


def test_release_and_bad_values() -> None:
    assert keep_host_memory({ENV: "release"}) is False
    with pytest.raises(CarlrarError, match=f"{ENV}='off': use keep"):
        keep_host_memory({ENV: "off"})


def test_the_cli_refuses_a_bad_value_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, ENV: "sometimes", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "carlrar.cli", "table2", "--help"]
    assert subprocess.run(cmd, capture_output=True, env=env, timeout=120).returncode == 0  # --help exits first
    cmd = [
        sys.executable,
        "-m",
        "carlrar.cli",
        "prepare",
        "--config",
        "c.yaml",
        "--dataset",
        "sst2",
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"carlrar prepare: error: {ENV}='sometimes': use keep (the default) or release"
    ]
