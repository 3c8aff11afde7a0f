"""The README's result blocks are the committed result files, verbatim (workflow/scripts/sync_readme.py)."""

from __future__ import annotations

import json
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


# --- config/README.md: the table of every config key, generated from the schema -------------------------------------
TABLE_SCRIPT = ROOT / "workflow" / "scripts" / "config_table.py"
BEGIN, END = "<!-- begin config table: workflow/scripts/config_table.py -->", "<!-- end config table -->"


def config_table(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TABLE_SCRIPT), *args], capture_output=True, text=True, check=False)


def test_config_readme_table_equals_the_schema() -> None:
    result = config_table("--check")
    assert result.returncode == 0, result.stderr
    text = (ROOT / "config" / "README.md").read_text(encoding="utf-8")
    for key in ("`analysis.steps` | integer | `10` | [1, 1000] |", "`datasets.<dataset>.per_class.train` |"):
        assert key in text


def test_every_schema_key_has_a_row_and_a_description() -> None:
    """A key missing from the table, or without a description, would send a user to the schema's JSON."""
    schema = json.loads((ROOT / "src/carlrar/schemas/config.schema.json").read_text(encoding="utf-8"))
    text = (ROOT / "config" / "README.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    documented = {row.split("`")[1]: row.rstrip(" |").rsplit(" | ", 1)[1] for row in rows}

    def keys(node: dict, path: str) -> list[str]:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node
        found = [path] if path else []
        for key, child in node.get("properties", {}).items():
            found += keys(child, f"{path}.{key}" if path else key)
        if isinstance(node.get("additionalProperties"), dict):
            found += keys(node["additionalProperties"], f"{path}.<dataset>")
        return found

    expected = keys(schema, "")
    assert list(documented) == expected
    assert all(len(description) > 10 for description in documented.values()), documented


def test_stale_config_table_is_reported_then_rewritten(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {
                    "ratio": {
                        "type": "number",
                        "exclusiveMinimum": 0,
                        "maximum": 1,
                        "default": 0.5,
                        "description": "a|b",
                    },
                    "name": {"enum": ["x", "y"], "default": "x", "description": "Which <name> to use."},
                },
            }
        )
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\n| old |\n{END}\nend\n")
    args = ("--schema", str(schema), "--readme", str(readme))
    stale = config_table("--check", *args)
    assert stale.returncode == 1 and "make readme" in stale.stderr
    assert config_table(*args).returncode == 0
    assert readme.read_text() == (
        f"intro\n{BEGIN}\n| Key | Type | Default | Allowed | Description |\n|---|---|---|---|---|\n"
        "| `ratio` | number | `0.5` | (0, 1] | a\\|b |\n"
        "| `name` | string | `x` | `x`, `y` | Which \\<name> to use. |\n"
        f"{END}\nend\n"
    )
    assert config_table("--check", *args).returncode == 0


def test_a_key_without_description_or_a_readme_without_the_block_fails(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}}}}))
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    result = config_table("--check", "--schema", str(schema), "--readme", str(readme))
    assert result.returncode == 2 and "keys without a description: a, a.b" in result.stderr
    readme.write_text("no table here\n")
    result = config_table("--schema", str(ROOT / "src/carlrar/schemas/config.schema.json"), "--readme", str(readme))
    assert result.returncode == 2 and "no table block" in result.stderr


def test_readme_rerun_table_is_the_one_the_rerun_tests_check() -> None:
    """README "What reruns when you change something" shows exactly tests/test_reruns.py's SCENARIOS."""
    from test_reruns import scenario_table

    assert scenario_table() in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_set_up_commands_are_plain_make_quick_and_make_test_and_ci_runs_them_so() -> None:
    """A newcomer types exactly these two (no RAW_DIR: the Makefile finds the data), and CI runs the second as typed."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Set-up", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split("#", 1)[0].strip() for line in block.splitlines()] == ["make quick", "make test"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "make test" in ci and "make test-slow" in ci
    assert any("CARLRAR_REQUIRE_REAL_DATA=1" in line and line.startswith("export ") for line in ci)
