"""carlrar.fingerprints and carlrar.plan: what a job's settings and code digests hold (tests/test_reruns.py checks
the workflow's reruns that follow from them on a real grid)."""

from __future__ import annotations

import ast
import copy
import shutil
from pathlib import Path

import pytest

from carlrar import fingerprints, plan, registry
from carlrar.config import load_config
from carlrar.fingerprints import PACKAGE_DIR, code_fingerprint, code_modules, method_settings, module_digest
from carlrar.registry import METHODS, PARTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A copy of the package's modules, to edit."""
    copy = tmp_path / "carlrar"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.fixture
def config() -> dict:
    return load_config(ROOT / "config" / "config.yaml").raw


def test_comments_docstrings_and_layout_leave_a_module_digest_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text('"""Doc."""\n\ndef f(x):\n    """Say why."""\n    return x + 1\n')
    before = module_digest(path)
    path.write_text(
        '"""Another doc."""\n# a comment\n\n\ndef f(x):  # why\n    """Other words."""\n    return (x + 1)\n'
    )
    assert module_digest(path) == before
    path.write_text('"""Doc."""\n\ndef f(x):\n    """Say why."""\n    return x + 2\n')
    assert module_digest(path) != before


def test_a_module_that_is_only_a_docstring_has_the_digest_of_an_empty_one(tmp_path: Path) -> None:
    (tmp_path / "words.py").write_text('"""Only words."""\n')
    (tmp_path / "empty.py").write_text("pass\n")
    assert module_digest(tmp_path / "words.py") == module_digest(tmp_path / "empty.py")


def test_contrastive_code_counts_for_carl_methods_only_and_data_code_for_prepare_only() -> None:
    for method, info in METHODS.items():
        modules = code_modules(plan.TRAINING_ENTRY, method)
        assert ("contrastive.py" in modules) == info.contrastive, method
        assert "data.py" not in modules and "cli.py" not in modules, method
    assert "data.py" in code_modules(plan.DATA_ENTRY)
    assert "contrastive.py" not in code_modules(plan.ATTACK_ENTRY, "carl")


def test_a_part_module_left_out_of_a_method_is_imported_by_the_method_builder_alone() -> None:
    """Leaving a module out is sound only if nothing the method runs reaches it but the builder's import."""
    for method in METHODS:
        kept = code_modules(plan.TRAINING_ENTRY, method)
        left_out = {m for part in PARTS.values() for m in part.modules} - set(kept)
        for module in kept:
            if module == fingerprints.METHOD_BUILDER:
                continue
            assert not fingerprints._package_imports(module, PACKAGE_DIR) & left_out, (method, module)


def test_semantic_edits_change_the_digests_of_exactly_the_methods_that_run_them(package: Path) -> None:
    before = {m: code_fingerprint(plan.TRAINING_ENTRY, m, package) for m in METHODS}
    path = package / "contrastive.py"
    path.write_text(path.read_text() + "\n# a comment only\n")
    assert {m: code_fingerprint(plan.TRAINING_ENTRY, m, package) for m in METHODS} == before
    path.write_text(path.read_text() + "\nEDITED = 1\n")
    after = {m: code_fingerprint(plan.TRAINING_ENTRY, m, package) for m in METHODS}
    assert {m for m in METHODS if after[m] != before[m]} == {"carl", "carl_rar"}


def test_a_new_import_joins_the_code_of_the_module_that_makes_it(package: Path) -> None:
    assert "paired.py" not in code_modules(plan.TRAINING_ENTRY, "base", package)
    path = package / "training.py"
    path.write_text(path.read_text() + "\nimport carlrar.paired\n")
    assert "paired.py" in code_modules(plan.TRAINING_ENTRY, "base", package)


def test_one_methods_section_changes_only_the_methods_that_read_it(config: dict) -> None:
    def settings(cfg: dict) -> dict:  # a copy: the settings share the config's nested values
        return copy.deepcopy({m: method_settings(cfg, "sst2", m) for m in METHODS})

    before = settings(config)
    config["training"]["carl"]["temperature"] = 0.5
    config["datasets"]["sst2"]["carl"]["negatives"] = 8
    changed = settings(config)
    assert {m for m in METHODS if changed[m] != before[m]} == {"carl", "carl_rar"}
    config["datasets"]["sst2"]["freelb"]["adv_lr"] = 0.05
    assert {m for m in METHODS if settings(config)[m] != before[m]} == set(METHODS) - {"base"}
    config["training"]["rar"]["weight"] = 0.5
    assert {m for m in METHODS if settings(config)[m] == changed[m]} == {"base"}


def test_a_new_method_with_its_own_section_changes_no_existing_run(config: dict, monkeypatch) -> None:
    before = copy.deepcopy({m: method_settings(config, "sst2", m) for m in METHODS})
    monkeypatch.setitem(PARTS, "toy", registry.Part(training_section="toy", dataset_section="toy", modules=()))
    monkeypatch.setitem(METHODS, "toy", registry.Method("Toy", parts=("freelb", "toy")))
    config["training"]["toy"] = {"weight": 1.0}
    config["datasets"]["sst2"]["toy"] = {"start": 3}
    assert {m: method_settings(config, "sst2", m) for m in before} == before
    assert method_settings(config, "sst2", "toy")["parts"]["toy"] == {
        "training": {"weight": 1.0},
        "dataset": {"start": 3},
    }


def test_grid_only_keys_and_prepare_settings(config: dict) -> None:
    base = copy.deepcopy(method_settings(config, "sst2", "base"))
    config["training"]["seeds"] = [7]
    config["training"]["methods"] = ["base"]
    config["datasets"]["sst2"]["freelb"]["adv_lr"] = 0.05
    assert method_settings(config, "sst2", "base") == base
    prepare = fingerprints.prepare_settings(config, "sst2")
    assert "freelb" not in prepare["dataset"] and "carl" not in prepare["dataset"]


def test_plan_lists_a_param_for_every_job_of_the_paper_grid(config: dict) -> None:
    params = plan.all_params(config)
    assert set(params["prepare"]) == set(config["datasets"])
    assert sum(len(seeds) for methods in params["train"].values() for seeds in methods.values()) == 60
    assert set(params["tables"]) == set(plan.GATHERING_ENTRIES)
    assert params["train"]["sst2"]["base"]["seed1"]["code"] != params["train"]["sst2"]["carl"]["seed1"]["code"]
    with pytest.raises(ValueError, match="no params"):
        plan.job_params(config, "nonsense")


def test_the_workflow_parses_the_fingerprints_module_without_heavy_imports() -> None:
    """carlrar.fingerprints, plan, sources and prepared-hash names are read at parse time: standard library only."""
    light = {"fingerprints.py", "plan.py", "registry.py", "sources.py"}
    for name in light:
        tree = ast.parse((PACKAGE_DIR / name).read_text())
        imported = {
            (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        }
        assert not imported & {"torch", "transformers", "pandas", "pyarrow", "datasets", "numpy"}, name


def test_run_identity_holds_the_methods_settings_and_code(monkeypatch) -> None:
    """`carlrar train` resumes a base run after a CARL setting changed, and refuses a checkpoint of other code."""
    from carlrar import identity
    from carlrar.config import from_mapping

    raw = load_config(ROOT / "config" / "config.yaml").raw

    def ident(cfg: dict, method: str) -> dict:
        return identity.run_identity(from_mapping(cfg), "sst2", method, 1, {"train": "x"}, None)

    base, carl = ident(raw, "base"), ident(raw, "carl")
    edited = copy.deepcopy(raw)
    edited["training"]["carl"]["temperature"] = 0.5
    assert ident(edited, "base") == base and ident(edited, "carl") != carl
    assert identity.differing_keys(carl, ident(edited, "carl")) == ["settings.parts.carl.training.temperature"]
    monkeypatch.setattr(identity, "code_fingerprint", lambda entry, method: "other code")
    assert identity.differing_keys(base, ident(raw, "base")) == ["code"]


def test_a_run_resumed_with_another_thread_count_is_another_run(monkeypatch) -> None:
    """CPU reductions split sums by thread: a checkpoint made with 2 threads is not resumed with 1."""
    import torch

    from carlrar import identity
    from carlrar.config import from_mapping

    config = from_mapping(load_config(ROOT / "config" / "config.yaml").raw)
    threads = torch.get_num_threads()
    two = identity.run_identity(config, "sst2", "base", 1, {}, None, "cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    other = identity.run_identity(config, "sst2", "base", 1, {}, None, "cpu")
    assert identity.differing_keys(two, other) == ["arithmetic.cpu_threads"]
