"""Which run a run folder belongs to, so that a checkpoint is only ever resumed by the run that wrote it.

A run's identity is everything that determines its weights and its metrics: method, seed, the settings its
method reads (carlrar.fingerprints.method_settings: the shared sections and its own parts' sections, not other
methods'), the code it runs (a digest blind to comments and docstrings), the content hashes of the prepared
splits and the RAR warm-up it starts from. A code change is therefore another run: its checkpoint is never
resumed by the changed code, which trains from step 0.

``carlrar train`` stores the identity in every checkpoint and in metrics.json, and before it touches a run
folder it compares: the same identity resumes, another one is refused with the differing keys named, and
``--restart`` (or, for the workflow, ``--restart-if-changed``) discards the other run's files first. So a
metrics.json never describes weights that another configuration or other code produced.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from carlrar import __version__
from carlrar.adversary import amp_dtype_for
from carlrar.config import Config
from carlrar.errors import CarlrarError, first_line
from carlrar.fingerprints import code_fingerprint, digest, method_settings
from carlrar.storage import recover_swaps, write_text

log = logging.getLogger(__name__)

IDENTITY_VERSION = 2  # bump when the identity's layout changes: older checkpoints are then another run

TRAINING_ENTRY = "training.py"  # the module `carlrar train` runs: its imports are the run's code
Restart = Literal["never", "if-changed", "always"]
RESTART_ADVICE = "rerun with --restart to discard it and train from step 0, or give another --out"

CHECKPOINT_DIR, BEST_DIR = "checkpoint", "best"
METRICS_FILE, PREDICTIONS_FILE = "metrics.json", "eval_predictions.parquet"
# Removed in this order, so that a kill part-way never leaves results without the files that vouch for them:
# metrics.json first (the mark of a finished run), the checkpoint last (the record of whose files these are).
RESULT_NAMES = (METRICS_FILE, PREDICTIONS_FILE, BEST_DIR, CHECKPOINT_DIR)
# Written when a fresh run starts: the proof that the folder is carlrar's, without which nothing in it is removed.
OWNER_FILE = "carlrar-run.txt"


def run_identity(
    config: Config,
    dataset: str,
    method: str,
    seed: int,
    data_sha256: dict[str, str],
    rar_warmup: str | None,
    device_request: str = "auto",
) -> dict[str, Any]:
    """Everything that determines a run's weights and metrics, as a JSON-able mapping.

    ``data_sha256`` maps each split to its content hash (the manifest's, verified against the parquet files);
    ``rar_warmup`` names the reconstructor head a RAR run starts from (the sha256 of a shared warm-up's head, or
    "own" for the warm-up the run makes itself from its config), None for the other methods.
    """
    return {
        "version": IDENTITY_VERSION,
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "settings": method_settings(config.raw, dataset, method),
        "code": code_fingerprint(TRAINING_ENTRY, method),
        "arithmetic": arithmetic(device_request, config.training["precision"]),
        "data_sha256": dict(data_sha256),
        "rar_warmup": rar_warmup,
    }


def arithmetic(device_request: str, precision: str) -> dict[str, Any]:
    """What changes a step's floating-point results besides the settings: the device type, the precision it
    computes in (``auto`` resolves per machine), the CPU's thread count (its reductions split the sums
    differently) and torch's version (its kernels). A checkpoint is resumed only under the same, so a run never
    mixes two computations; the workflow's rerun params leave these out, so moving finished runs reruns nothing."""
    kind = "cuda" if device_request != "cpu" and torch.cuda.is_available() else "cpu"
    amp = amp_dtype_for(precision, torch.device(kind))
    return {
        "device": kind,
        "precision": "bf16" if amp == torch.bfloat16 else "fp32",
        "cpu_threads": torch.get_num_threads() if kind == "cpu" else None,
        "torch": torch.__version__,
    }


def fingerprint(identity: dict[str, Any]) -> str:
    """A short stable digest of an identity, for logs and for comparing at a glance."""
    return digest(identity)


def differing_keys(stored: Any, expected: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaves where two identities differ (a whole section when its shape differs)."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        found: list[str] = []
        for key in sorted(set(stored) | set(expected), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored or key not in expected:
                found.append(name)
            else:
                found += differing_keys(stored[key], expected[key], name)
        return found
    return [] if stored == expected else [prefix or "<identity>"]


def describe_difference(stored: dict[str, Any], expected: dict[str, Any], limit: int = 4) -> str:
    """The differing keys with old -> new values, shortened to fit one line."""
    keys = differing_keys(stored, expected)
    parts = []
    for key in keys[:limit]:
        old, new = _lookup(stored, key), _lookup(expected, key)
        parts.append(f"{key} {_short(old)} -> {_short(new)}")
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(parts) + more


def _lookup(identity: dict[str, Any], dotted: str) -> Any:
    node: Any = identity
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "(none)"
        node = node[part]
    return node


def _short(value: Any, width: int = 24) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def _recorded_identity(path: Path, what: str) -> dict[str, Any] | None:
    """The identity a checkpoint's state.json or a metrics.json records ({} for files from before identities)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CarlrarError(f"{what} {path} is unreadable ({first_line(exc)}); {RESTART_ADVICE}") from None
    if not isinstance(record, dict):
        raise CarlrarError(f"{what} {path} is not a carlrar record; {RESTART_ADVICE}")
    identity = record.get("run_identity")
    return identity if isinstance(identity, dict) else {}


Start = Literal["fresh", "resume", "finished"]


def _owned(run_dir: Path, recorded: dict[str, dict[str, Any] | None]) -> None:
    """Refuse a folder that holds files carlrar cannot prove it wrote (no owner mark, no run record)."""
    if not run_dir.is_dir() or (run_dir / OWNER_FILE).is_file() or any(r is not None for r in recorded.values()):
        return
    entries = sorted(p.name for p in run_dir.iterdir())
    if entries:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise CarlrarError(
            f"{run_dir} holds files that no carlrar run wrote ({shown}); give --out a new or empty folder "
            "(nothing was changed)"
        )


def prepare_run_folder(run_dir: Path, identity: dict[str, Any], restart: Restart = "never") -> Start:
    """Decide, before any training, how ``run_dir`` starts: "fresh", "resume" (its checkpoint is this run's) or
    "finished" (this run's results are complete though its checkpoint was removed: nothing to train).

    A folder is this run's to change only if carlrar made it (its owner mark, or a run record from before the
    mark): any other non-empty folder is refused untouched, whatever ``restart`` says. A checkpoint or metrics.json
    of another identity is refused unless ``restart`` is "always" or "if-changed"; then the other run's results
    and checkpoint are removed (only the names a run writes: nothing else in the folder is touched). Discarding
    this run's own finished results needs ``restart`` "always".
    """
    if restart not in ("never", "if-changed", "always"):
        raise ValueError(f"restart must be never, if-changed or always, not {restart!r}")
    recover_swaps(run_dir)  # a checkpoint swap a kill interrupted is finished before the checkpoint is read
    recorded = {
        "checkpoint": _recorded_identity(run_dir / CHECKPOINT_DIR / "state.json", "the checkpoint"),
        "metrics": _recorded_identity(run_dir / METRICS_FILE, "the results file"),
    }
    _owned(run_dir, recorded)
    if restart == "always":
        return _fresh(run_dir, "--restart")
    others = {where: found for where, found in recorded.items() if found is not None and found != identity}
    if others:
        where, found = next(iter(others.items()))
        what = f"its {where}" if where == "checkpoint" else "its metrics.json"
        if not found:
            reason = f"{what} was written by an earlier carlrar that recorded no run identity"
        else:
            reason = f"{what} belongs to another run ({describe_difference(found, identity)})"
        if restart == "never":
            raise CarlrarError(f"{run_dir} holds another run: {reason}; {RESTART_ADVICE}")
        return _fresh(run_dir, reason)
    if recorded["checkpoint"] is not None:
        return "resume"
    if recorded["metrics"] is not None:
        if (run_dir / BEST_DIR).is_dir() and (run_dir / PREDICTIONS_FILE).is_file():
            return "finished"
        raise CarlrarError(
            f"{run_dir} holds this run's metrics.json but neither its checkpoint nor all its results; "
            "rerun with --restart to train it again (its metrics.json is then removed)"
        )
    return _fresh(run_dir, "no checkpoint of this run to resume")


def _fresh(run_dir: Path, reason: str) -> Start:
    _discard(run_dir, reason)
    return "fresh"


def claim_run_folder(run_dir: Path) -> None:
    """Mark ``run_dir`` as a carlrar run's before its first file is written (a refused start writes nothing)."""
    if not (run_dir / OWNER_FILE).is_file():
        write_text(run_dir / OWNER_FILE, "A carlrar training run's folder: carlrar removes only what it writes.\n")


def _discard(run_dir: Path, reason: str) -> None:
    """Remove the run's results and checkpoint (metrics.json first); log what was removed and why."""
    removed = []
    for name in RESULT_NAMES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            # The record first: a kill during the removal then leaves files nothing vouches for, never a record
            # whose weights are half gone.
            (path / "state.json").unlink(missing_ok=True)
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        log.warning("discarded %s in %s (%s); training from step 0", ", ".join(removed), run_dir, reason)


def library_versions() -> dict[str, str]:
    """The versions a run records beside its metrics (its identity holds torch's too: see arithmetic)."""
    import transformers

    return {
        "carlrar": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
