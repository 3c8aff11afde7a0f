"""Writing outputs so that a crash never leaves a half-written file or folder behind, and hashing them.

Every output is written beside its target under a hidden temporary name (``.<name>.<random>.tmp``) and renamed
over it when complete; a folder that already exists is first renamed to ``.<name>.<random>.old``. A process killed
part-way leaves those hidden entries behind: :func:`recover_swaps` finishes or undoes such a swap (it runs before
every write of the same target and when a command starts), so a kill never loses an output or leaves litter.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from carlrar.errors import CarlrarError

log = logging.getLogger(__name__)
# mkstemp / mkdtemp names: a hidden prefix ".<target>.", 8 random characters, then our suffix
_SWAP_ENTRY = re.compile(r"^\.(?P<target>.+)\.(?P<token>[a-z0-9_]{8})\.(?P<kind>tmp|old)$")


# Errors that mean the file system took no more bytes, and how libraries that are not Python's own I/O word them
# (safetensors: "I/O error: No space left on device (os error 28)"; pyarrow raises OSError with the errno).
_FULL = {
    errno.ENOSPC: ("no space left on device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space"),
    errno.EFBIG: ("file size limit exceeded (ulimit -f)", "raise the limit (ulimit -f unlimited)"),
}
_FULL_TEXTS = {
    "(os error 28)": errno.ENOSPC,
    "No space left on device": errno.ENOSPC,
    "(os error 122)": errno.EDQUOT,
    "Disk quota exceeded": errno.EDQUOT,
    "(os error 27)": errno.EFBIG,
    "File too large": errno.EFBIG,
}


class DiskFull(CarlrarError):
    """An output could not be written for lack of space (or a file size limit); its temporary copy is removed."""

    def __init__(self, code: int, path: Path) -> None:
        what, remedy = _FULL[code]
        super().__init__(f"{what} writing {path}; {remedy} or point --out elsewhere (nothing was replaced)")
        self.code = code


def _full_code(exc: BaseException) -> int | None:
    """The errno of a write refused for space, whichever library raised it; None for any other error."""
    if isinstance(exc, DiskFull):
        return exc.code
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return exc.errno
    text = str(exc)
    return next((code for marker, code in _FULL_TEXTS.items() if marker in text), None)


@contextlib.contextmanager
def _space_errors_name(path: Path) -> Iterator[None]:
    """Turn a write refused for space inside the block into one DiskFull naming ``path`` (the outermost target)."""
    try:
        yield
    except Exception as exc:
        code = _full_code(exc)
        if code is None:
            raise
        raise DiskFull(code, path) from None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def recover_swaps(folder: str | Path, target: str | None = None) -> list[str]:
    """Finish or undo the swaps a killed process left in ``folder`` (only those of ``target`` when given).

    A ``.tmp`` with its ``.old`` and no target means the kill came between the two renames of a folder swap: the
    ``.tmp`` is the complete new copy and becomes the target. A ``.tmp`` alone was still being written and is
    removed; an ``.old`` whose target exists is removed, one without it is restored. Returns what was done (also
    logged as warnings): recovery is never silent.
    """
    folder = Path(folder)
    swaps: dict[tuple[str, str], dict[str, Path]] = {}
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = _SWAP_ENTRY.match(entry.name)
        if match and (target is None or match["target"] == target):
            swaps.setdefault((match["target"], match["token"]), {})[match["kind"]] = entry
    actions = []
    for (name, _), parts in sorted(swaps.items()):
        final, tmp, old = folder / name, parts.get("tmp"), parts.get("old")
        if tmp is not None and old is not None and not final.exists():
            os.replace(tmp, final)
            _remove(old)
            actions.append(f"{final}: finished a swap a kill interrupted between its two renames (the new copy)")
        elif old is not None and not final.exists():
            os.replace(old, final)
            actions.append(f"{final}: restored the previous copy a kill left as {old.name}")
        else:
            for leftover in (tmp, old):
                if leftover is not None:
                    _remove(leftover)
                    actions.append(f"{final}: removed {leftover.name}, an unfinished write left by a kill")
    for action in actions:
        log.warning("%s", action)
    return actions


def check_output_dir(path: str | Path, option: str = "--out", replaces: str | None = None) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be created there.

    An output that replaces its folder as a whole names the file its own folders hold (``replaces``): an existing,
    non-empty folder without it is the user's, not an earlier output, and is refused rather than replaced.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CarlrarError(f"{path} exists and is not a folder; give {option} a folder path (nothing was changed)")
    if replaces and path.is_dir() and any(path.iterdir()) and not (path / replaces).is_file():
        raise CarlrarError(
            f"{path} holds files but no {replaces}, so it is not an earlier output this command may replace; "
            f"give {option} a new or empty folder (nothing was changed)"
        )
    _check_creatable(path, option)


def check_output_file(path: str | Path, option: str = "--out") -> None:
    """Refuse, before any work, an output file path that is a folder or cannot be created there."""
    path = Path(path)
    if path.is_dir():
        raise CarlrarError(f"{path} is a folder; give {option} a file path (nothing was changed)")
    _check_creatable(path, option)


def _check_creatable(path: Path, option: str) -> None:
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CarlrarError(f"{ancestor} is a file, so {option} {path} cannot be created; give another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CarlrarError(f"cannot write in {ancestor} (permission denied), so {option} {path} cannot be created")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure delete it."""
    path = Path(path)
    check_output_file(path, "the output")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_swaps(path.parent, path.name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from other users of a shared cluster
    try:
        with _space_errors_name(path):
            yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Read a JSON file written by a pipeline step; a missing or broken file is one clear CarlrarError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CarlrarError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CarlrarError(f"{path} is not valid JSON: {exc}") from None


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` as a whole.

    On failure the temporary folder is removed and an existing ``path`` is left untouched. A ``path`` that is a
    file is refused before anything happens (it would otherwise be moved aside as if it were an old output).
    """
    path = Path(path)
    check_output_dir(path, "the output")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_swaps(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        with _space_errors_name(path):
            yield tmp
        if path.exists():
            old = tmp.with_suffix(".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def lock_path(output: str | Path) -> Path:
    """The lock file of an output folder or file: a hidden sibling, so that swapping the output keeps it."""
    output = Path(output)
    return output.parent / f".{output.name}.lock"


@contextlib.contextmanager
def exclusive(output: str | Path, option: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on ``output`` (an output folder or file) while the block runs.

    A second carlrar process on the same output fails at once with one line naming the holder (host, pid and
    command, which the holder writes into the lock file). The OS drops the lock when its process ends, however it
    ends, so a killed run leaves no stale lock, only the small file; a process that ends normally removes it.
    """
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _locked(path, output, option)
    try:
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]])
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()} ({command})".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked: a process that opened it now fails, and one after makes anew
        os.close(fd)


def _locked(path: Path, output: str | Path, option: str) -> int:
    """A descriptor of ``path`` holding its lock; the file it locked is still the one at ``path``."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise CarlrarError(
                f"{output} is in use by {holder}; wait for it to finish, or give {option} another path "
                "(nothing was changed)"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file as we locked it: lock the one now there
