"""Atomic outputs: every state a kill can leave is recovered on the next write or start, nothing of the user's moved."""

from __future__ import annotations

from pathlib import Path

import pytest

from carlrar.errors import CarlrarError
from carlrar.storage import atomic_dir, atomic_path, recover_swaps, write_text


def folder(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "state.json").write_text(content)
    return path


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_kill_between_the_two_renames_keeps_the_new_copy(tmp_path: Path) -> None:
    folder(tmp_path / ".checkpoint.ab12cd_3.old", "step 3")
    folder(tmp_path / ".checkpoint.ab12cd_3.tmp", "step 6")
    actions = recover_swaps(tmp_path)
    assert (tmp_path / "checkpoint/state.json").read_text() == "step 6"
    assert hidden(tmp_path) == [] and len(actions) == 1 and "between its two renames" in actions[0]


def test_kill_after_the_swap_or_during_a_write_removes_the_leftovers(tmp_path: Path) -> None:
    folder(tmp_path / "checkpoint", "step 6")
    folder(tmp_path / ".checkpoint.ab12cd_3.old", "step 3")  # killed while removing the old copy
    folder(tmp_path / ".checkpoint.zz99yy_1.tmp", "half")  # killed while writing the next one
    (tmp_path / ".metrics.json.qwertyui.tmp").write_text("{")  # killed while writing a file
    assert len(recover_swaps(tmp_path)) == 3
    assert (tmp_path / "checkpoint/state.json").read_text() == "step 6" and hidden(tmp_path) == []


def test_an_old_copy_without_its_target_is_restored(tmp_path: Path) -> None:
    folder(tmp_path / ".best.abcdefgh.old", "best")
    recover_swaps(tmp_path)
    assert (tmp_path / "best/state.json").read_text() == "best" and hidden(tmp_path) == []


def test_recovery_touches_only_the_named_target_and_swap_names(tmp_path: Path) -> None:
    folder(tmp_path / ".sst2.abcdefgh.tmp", "another job's write in progress")
    (tmp_path / ".notes.tmp").write_text("the user's")
    assert recover_swaps(tmp_path, "ag_news") == []
    assert hidden(tmp_path) == [".notes.tmp", ".sst2.abcdefgh.tmp"]


def test_the_next_write_of_a_target_recovers_its_interrupted_swap(tmp_path: Path) -> None:
    folder(tmp_path / ".out.abcdefgh.tmp", "half")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("new")
    (tmp_path / ".table.md.abcdefgh.tmp").write_text("half")
    write_text(tmp_path / "table.md", "done")
    assert hidden(tmp_path) == [] and (tmp_path / "table.md").read_text() == "done"


def test_an_output_folder_that_is_a_file_is_refused_untouched(tmp_path: Path) -> None:
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    with pytest.raises(CarlrarError, match="exists and is not a folder"):
        with atomic_dir(user_file):
            raise AssertionError("the body must not run")
    with pytest.raises(CarlrarError, match="is a folder; give the output a file path"):
        with atomic_path(tmp_path):
            raise AssertionError("the body must not run")
    with pytest.raises(CarlrarError, match="notes.txt is a file, so the output .* cannot be created"):
        write_text(user_file / "inside.md", "x")
    assert user_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
