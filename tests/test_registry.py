"""carlrar.registry is the one list of datasets and methods: every other place that names them must agree."""

from __future__ import annotations

from carlrar.cli import build_parser
from carlrar.config import load_schema
from carlrar.data import DATASETS as DATASET_SPECS
from carlrar.registry import DATASET_IDS, METHOD_IDS, METHODS


def _choices(command: str, option: str) -> set[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    sub = subparsers.choices[command]
    (action,) = [a for a in sub._actions if option in a.option_strings]
    return set(action.choices)


def test_schema_enums_name_the_registry() -> None:
    schema = load_schema()["properties"]
    assert schema["training"]["properties"]["methods"]["items"]["enum"] == list(METHOD_IDS)
    assert set(schema["datasets"]["propertyNames"]["enum"]) == set(DATASET_IDS)
    assert set(schema["analysis"]["properties"]["datasets"]["items"]["enum"]) == set(DATASET_IDS)
    # the search tunes FreeLB's values, so only the adversarial methods can be searched
    assert schema["hpsearch"]["properties"]["method"]["enum"] == [m for m in METHOD_IDS if METHODS[m].adversarial]


def test_data_module_describes_every_dataset() -> None:
    assert set(DATASET_SPECS) == set(DATASET_IDS)


def test_command_line_choices_are_the_registry() -> None:
    for command in ("prepare", "train", "rar-warmup"):
        assert _choices(command, "--dataset") == set(DATASET_IDS), command
    assert _choices("train", "--method") == set(METHOD_IDS)


def test_every_method_that_regularises_is_adversarial() -> None:
    for name, method in METHODS.items():
        assert method.adversarial or not (method.contrastive or method.reconstruction), name


def test_typed_config_sections_mirror_the_schema() -> None:
    """Each typed section has exactly the schema's keys, so a key added to one cannot be missed by the other."""
    from dataclasses import MISSING, fields

    from carlrar.config import AnalysisConfig, CarlLossConfig, RarConfig

    schema = load_schema()["properties"]
    training = schema["training"]["properties"]
    for cls, section in (
        (CarlLossConfig, training["carl"]),
        (RarConfig, training["rar"]),
        (AnalysisConfig, schema["analysis"]),
    ):
        assert {f.name for f in fields(cls)} == set(section["properties"]), cls.__name__
        assert all(f.default is MISSING for f in fields(cls)), f"{cls.__name__}: defaults live in the schema"


def test_library_dataclass_defaults_are_the_schema_defaults() -> None:
    """FreeLBConfig(), DataConfig() ... keep defaults for library users; they must be the schema's, not a second set."""
    from dataclasses import MISSING, fields

    from carlrar.config import CarlScheduleConfig, DataConfig, DatasetConfig, FreeLBConfig

    schema = load_schema()
    dataset = schema["$defs"]["dataset"]["properties"]
    checked = 0
    for cls, section in (
        (FreeLBConfig, dataset["freelb"]),
        (CarlScheduleConfig, dataset["carl"]),
        (DatasetConfig, schema["$defs"]["dataset"]),
        (DataConfig, schema["properties"]["data"]),
    ):
        for f in fields(cls):
            if f.default is not MISSING and "default" in section["properties"].get(f.name, {}):
                assert f.default == section["properties"][f.name]["default"], f"{cls.__name__}.{f.name}"
                checked += 1
    assert checked >= 10
