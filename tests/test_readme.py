"""The README's result blocks are the committed result files, verbatim (workflow/scripts/sync_readme.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers.paths import ROOT

SCRIPT = ROOT / "workflow" / "scripts" / "sync_readme.py"


def sync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False)


def test_readme_blocks_equal_the_committed_results() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count("<!-- include ") >= 4  # the quick and the evidence run's tables are included, not typed
    result = sync("--check")
    assert result.returncode == 0, result.stderr


def test_stale_block_is_reported_then_rewritten(tmp_path: Path) -> None:
    (tmp_path / "table.md").write_text("| a |\n|---|\n| 2 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- include table.md -->\n| a |\n|---|\n| 1 |\n<!-- end include -->\nend\n")
    stale = sync("--check", "--readme", str(readme))
    assert stale.returncode == 1 and "table.md" in stale.stderr
    assert sync("--readme", str(readme)).returncode == 0
    assert readme.read_text() == "intro\n<!-- include table.md -->\n| a |\n|---|\n| 2 |\n<!-- end include -->\nend\n"
    assert sync("--check", "--readme", str(readme)).returncode == 0


def test_block_naming_a_missing_file_fails(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("<!-- include nowhere.md -->\n<!-- end include -->\n")
    result = sync("--check", "--readme", str(readme))
    assert result.returncode == 2 and "nowhere.md" in result.stderr


def _sentences(config: Path, dataset: str, split: str) -> str:
    """'1,400'-style count of a split's examples as the config asks for them (per class x classes)."""
    import yaml

    classes = {"sst2": 2, "ag_news": 4}[dataset]
    per_class = yaml.safe_load(config.read_text())["datasets"][dataset]["per_class"][split]
    return f"{per_class * classes:,}"


def test_readme_sizes_match_the_configs() -> None:
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    quick, evidence = ROOT / "config" / "quick.yaml", ROOT / "config" / "minilm.yaml"
    assert (
        f"{_sentences(quick, 'sst2', 'train')} SST-2 training sentences ({_sentences(quick, 'sst2', 'dev')} GLUE dev"
        in readme
    )
    assert (
        f"{_sentences(quick, 'ag_news', 'train')} AG's News articles ({_sentences(quick, 'ag_news', 'dev')} dev, "
        in readme
    )
    assert f"{_sentences(evidence, 'sst2', 'train')} SST-2 training sentences evaluated on" in readme
    assert f"{_sentences(evidence, 'ag_news', 'train')} AG's News articles" in readme
    assert f"({_sentences(evidence, 'ag_news', 'dev')} dev, {_sentences(evidence, 'ag_news', 'test')} test)" in readme
