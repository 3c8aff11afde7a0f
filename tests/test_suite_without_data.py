"""The suite in a clone without the real datasets: their tests skip and say why, unless CI demands the data."""

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
