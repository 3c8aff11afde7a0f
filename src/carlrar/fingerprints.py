"""What each job depends on, as short digests: the settings it reads and the code it runs.

Three callers use these functions, so they agree by construction: ``carlrar train`` (the run identity: a
checkpoint is resumed only under the same settings and code), the Snakemake rules (params: a job reruns exactly
when one of its digests changes) and the DVC pipeline (``dvc_stage.py fingerprints`` writes them to a params
file). Standard library only, so the workflow reads it while parsing, before torch is importable.

Settings: a run of method M on dataset D depends on the shared settings (model, data, the training core, D's
own section) and on the sections of M's parts only (carlrar.registry.PARTS). A section that belongs to a part
is left out of every other method's settings, so editing CARL's temperature reruns carl and carl_rar, not base,
and adding a method with a new section changes no existing run.

Code: a module's digest is that of its syntax tree without docstrings or positions, so a comment, a docstring
or a reformatting changes nothing and any change to what runs changes it. A job's code is its entry module and
every package module that imports reach from it. The method builder (``methods.py``) imports every part's
modules but calls them only for methods that have the part, so an import from the builder of a module of a part
that the method lacks does not count; an import of that module from anywhere else does.
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from carlrar.registry import METHODS, PARTS

PACKAGE_DIR = Path(__file__).parent
METHOD_BUILDER = "methods.py"
DISPATCH_ONLY = ("cli.py",)  # the command line only dispatches: what a job runs starts at its entry module
GRID_TRAINING_KEYS = ("seeds", "methods")  # they pick which runs exist, not what one run does


def digest(obj: Any) -> str:
    """A short stable digest of JSON-able data (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- code ------------------------------------------------------------------------------------------------------
def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


def _version(path: Path) -> tuple[Path, int, int]:
    """A cache key that changes with the file: the workflow asks for the same digests once per job."""
    stat = path.stat()
    return path, stat.st_mtime_ns, stat.st_size


@cache
def _parse(version: tuple[Path, int, int]) -> ast.Module:
    return ast.parse(version[0].read_text(encoding="utf-8"), filename=str(version[0]))


@cache
def _digest_of(version: tuple[Path, int, int]) -> str:
    tree = _without_docstrings(ast.parse(version[0].read_text(encoding="utf-8"), filename=str(version[0])))
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()[:16]


def _parsed(path: Path) -> ast.Module:
    return _parse(_version(path))


def module_digest(path: Path) -> str:
    """The digest of what a Python file does: comments, docstrings and layout do not count."""
    return _digest_of(_version(path))


def _package_imports(module: str, package_dir: Path) -> set[str]:
    """The package modules (file names) that one module imports, lazily or not."""
    found = set()
    for node in ast.walk(_parsed(package_dir / module)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "carlrar" and len(parts) > 1 and (package_dir / f"{parts[1]}.py").is_file():
                found.add(f"{parts[1]}.py")
    return found


def _foreign_part_modules(method: str | None) -> set[str]:
    """Modules of the parts ``method`` lacks (none when no method is given: the job runs every part)."""
    if method is None:
        return set()
    own = set(METHODS[method].parts)
    return {module for name, part in PARTS.items() if name not in own for module in part.modules}


def code_modules(entry: str, method: str | None = None, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """The modules a job runs, as sorted file names: ``entry`` and what it imports, for ``method``'s parts."""
    foreign = _foreign_part_modules(method)
    seen: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in seen or module in DISPATCH_ONLY:
            continue
        seen.add(module)
        imported = _package_imports(module, package_dir)
        if module == METHOD_BUILDER:
            imported -= foreign
        todo.extend(imported)
    return sorted(seen)


def code_fingerprint(entry: str, method: str | None = None, package_dir: Path = PACKAGE_DIR) -> str:
    """The digest of the code a job runs (see :func:`code_modules`)."""
    modules = code_modules(entry, method, package_dir)
    return digest({module: module_digest(package_dir / module) for module in modules})


# --- settings ----------------------------------------------------------------------------------------------------
def _part_sections() -> tuple[set[str], set[str]]:
    training = {p.training_section for p in PARTS.values() if p.training_section}
    dataset = {p.dataset_section for p in PARTS.values() if p.dataset_section}
    return training, dataset


def shared_settings(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    """What every method's run on ``dataset`` reads: model, data, the training core and the dataset's own keys."""
    training_parts, dataset_parts = _part_sections()
    skip = training_parts | set(GRID_TRAINING_KEYS)
    return {
        "model": config["model"],
        "data": config["data"],
        "training": {k: v for k, v in config["training"].items() if k not in skip},
        "dataset": {k: v for k, v in config["datasets"][dataset].items() if k not in dataset_parts},
    }


def method_settings(config: dict[str, Any], dataset: str, method: str) -> dict[str, Any]:
    """Everything in a (resolved) config that the weights of ``method`` on ``dataset`` depend on."""
    parts = {}
    for name in METHODS[method].parts:
        part = PARTS[name]
        parts[name] = {
            "training": config["training"].get(part.training_section) if part.training_section else None,
            "dataset": config["datasets"][dataset].get(part.dataset_section) if part.dataset_section else None,
        }
    return {**shared_settings(config, dataset), "method": method, "parts": parts}


def prepare_settings(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    """What sampling ``dataset`` reads: the data section and the dataset's own keys (no method's)."""
    shared = shared_settings(config, dataset)
    return {"data": shared["data"], "dataset": shared["dataset"]}


def warmup_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What RAR's reconstructor warm-up reads: the model, the data section and training.rar's warmup_* keys."""
    rar_section = PARTS["rar"].training_section
    rar = {k: v for k, v in config["training"][rar_section].items() if k.startswith("warmup_")}
    return {
        "model": config["model"],
        "data": config["data"],
        "rar": rar,
        "eval_batch_size": config["training"]["eval_batch_size"],
        "precision": config["training"].get("precision"),
    }
