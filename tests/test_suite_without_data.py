"""The suite in a clone without the real datasets: where `make` looks for them, and their tests skip and say why,
unless CI demands the data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.paths import ROOT


def real_data_tests(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """tests/test_data.py's real-data tests with RAW_DIR pointing at an empty folder."""
    empty = tmp_path / "raw"
    empty.mkdir()
    environ = {k: v for k, v in os.environ.items() if k != "CARLRAR_REQUIRE_REAL_DATA"}
    environ.update({"RAW_DIR": str(empty), **env})
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_data.py", "-k", "real"]
    return subprocess.run(args, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)


def test_missing_real_data_is_a_skip_naming_the_folder(tmp_path: Path) -> None:
    result = real_data_tests(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 skipped" in result.stdout and "passed" not in result.stdout
    assert f"real datasets not found: {tmp_path / 'raw'} lacks sst2/train.tsv" in result.stdout


def test_ci_s_flag_turns_the_skips_into_failures(tmp_path: Path) -> None:
    result = real_data_tests(tmp_path, CARLRAR_REQUIRE_REAL_DATA="1")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "3 errors" in result.stdout
    assert "CARLRAR_REQUIRE_REAL_DATA=1: missing real data is an error" in result.stdout


def make_test_raw_dir(tmp_path: Path, with_shared_data: bool) -> str:
    """The RAW_DIR that `make test` passes to pytest in a checkout at tmp_path/repo (a dry run, -n)."""
    repo = tmp_path / "repo"
    (repo / ".venv").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml"):
        (repo / name).write_bytes((ROOT / name).read_bytes())
    (repo / ".venv" / ".carlrar-installed").touch()  # newer than pyproject.toml: `make setup` has nothing to do
    if with_shared_data:
        (tmp_path / "shared" / "data").mkdir(parents=True)
    # as typed in a shell: no RAW_DIR from the environment, nor from an outer `make test RAW_DIR=...` (MAKEFLAGS)
    environ = {k: v for k, v in os.environ.items() if k not in ("RAW_DIR", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(["make", "-n", "test"], cwd=repo, env=environ, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split('RAW_DIR="', 1)[1].split('"', 1)[0]


def test_make_finds_shared_data_beside_the_checkout_else_data_raw(tmp_path: Path) -> None:
    assert make_test_raw_dir(tmp_path / "ci", with_shared_data=True) == str(tmp_path / "ci" / "shared" / "data")
    assert make_test_raw_dir(tmp_path / "clone", with_shared_data=False) == str(tmp_path / "clone/repo/data/raw")
