"""Configuration: one YAML file, validated against a JSON schema, read into typed objects.

The same schema (``schemas/config.schema.json``) validates the Snakemake config, so the workflow and the
library can never disagree about a key or a default.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jsonschema
import yaml

from carlrar.errors import CarlrarError, first_line

SplitName = Literal["train", "dev", "test"]
Size = int | Literal["all"]


class ConfigError(CarlrarError):
    """The configuration does not match the schema."""


# A config holds a few hundred values; YAML aliases (*name) can make a few hundred bytes stand for billions of them
# (a "billion laughs" file), which PyYAML builds cheaply as shared objects but every walk over the config expands.
MAX_CONFIG_VALUES = 100_000


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error instead of the last one winning.

    Two ``training:`` blocks would otherwise silently replace the first with the second. Keys that a merge
    (``<<: *base``) brings in may still be overridden: only the keys written in the mapping itself are compared.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):  # unhashable: PyYAML's own construct_mapping reports it
                continue
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {first}); keep one of them",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """YAML text as Python objects: no duplicate keys, no alias expansion beyond MAX_CONFIG_VALUES values.

    Raises yaml.YAMLError (a duplicate key names its line) or ConfigError (an alias bomb).
    """
    data = yaml.load(text, Loader=StrictLoader)  # a SafeLoader: builds plain data only
    check_size(data)
    return data


class DuplicateKey(ValueError):
    """A JSON object names a key twice."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise DuplicateKey(key)
    return dict(pairs)


def _parse_json(text: str) -> Any:
    """A JSON config (which Snakemake also accepts, e.g. tab-indented where YAML would refuse the tabs).

    Raises ValueError when the text is not JSON, ConfigError when it is JSON naming a key twice.
    """
    try:
        data = json.loads(text, object_pairs_hook=_unique_pairs)
    except DuplicateKey as exc:
        raise ConfigError(f"duplicate key {exc.args[0]!r} in a JSON object; keep one of them") from None
    check_size(data)
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as "line N: problem", PyYAML's multi-line report cut to what names the fault."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        return first_line(exc)
    return f"line {mark.line + 1}: {problem}"


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """Read a YAML (or JSON) file with :func:`parse_yaml`; every way it can fail is one ConfigError naming the file.

    Used for every YAML config the project reads (``load_config``, the workflow's --configfile re-check,
    DVC's params.yaml), so a duplicate key, an alias bomb or a non-UTF-8 file fails the same way everywhere.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    try:
        return _parse_config_text(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _parse_config_text(text: str) -> Any:
    """JSON first, then YAML, as Snakemake reads a --configfile (tab-indented JSON is no valid YAML)."""
    try:
        return _parse_json(text)
    except ValueError:
        return parse_yaml(text)


def check_size(raw: Any, limit: int = MAX_CONFIG_VALUES) -> None:
    """Refuse a config that expands to more than ``limit`` values, counting an aliased block at each use.

    The walk stops at the first value past the limit, so it costs at most ``limit`` steps however large the
    expansion (or a recursive alias, which never ends) would be.
    """
    pending, count = [raw], 0
    while pending:
        node = pending.pop()
        count += 1
        if count > limit:
            raise ConfigError(
                f"the config expands to more than {limit:,} values (YAML aliases such as *name repeating large "
                "blocks, or a recursive alias); write the values out or remove the aliases"
            )
        if isinstance(node, dict):
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)


def load_schema() -> dict[str, Any]:
    return json.loads(resources.files("carlrar").joinpath("schemas/config.schema.json").read_text())


def _validator_filling_defaults(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A validator that also writes each property's ``default`` into the instance, depth first."""
    base = jsonschema.Draft202012Validator

    def properties_with_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = json.loads(json.dumps(sub["default"]))
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    cls = jsonschema.validators.extend(base, {"properties": properties_with_defaults})
    return cls(schema)


def _error_line(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "enum":
        allowed = ", ".join(repr(v) for v in error.validator_value)
        return f"config key '{where}': {error.instance!r} is not allowed; choose one of {allowed}"
    if error.validator == "pattern":  # the schema's description says what the pattern means
        rule = error.schema.get("description", "see config/README.md")
        return f"config key '{where}': {error.instance!r} is not allowed; {rule[:1].lower()}{rule[1:]}"
    if error.validator in ("oneOf", "anyOf") and error.context:
        # the branch of the value's own type names the fault (a bad path), not "not of type 'array'"
        fitting = [e for e in error.context if e.validator != "type"] or error.context
        return _error_line(jsonschema.exceptions.best_match(fitting))
    if error.validator == "additionalProperties":
        known = ", ".join(sorted(error.schema.get("properties", {})))
        return f"config key '{where}': {error.message}; known keys: {known}"
    return f"config key '{where}': {error.message}"


def _non_finite_key(node: Any, where: str = "") -> str | None:
    """The dotted key of the first NaN or infinite number (YAML's .nan / .inf), which no bound would catch."""
    if isinstance(node, float) and not math.isfinite(node):
        return where or "<top level>"
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        found = _non_finite_key(child, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


# YAML 1.2 floats without a dot (1e-4, 5E3): YAML 1.1, which PyYAML and Snakemake follow, reads them as strings.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def _schema_node(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    return root["$defs"][ref.rsplit("/", 1)[1]] if ref.startswith("#/$defs/") else schema


def coerce_exponent_numbers(raw: Any, schema: dict[str, Any] | None = None, root: dict[str, Any] | None = None) -> Any:
    """Turn strings such as "1e-4" into floats where the schema expects a number (in place; returns ``raw``).

    Only number-typed keys are touched, so a file name or run name that happens to look like 1e5 stays a string.
    """
    root = root or load_schema()
    schema = _schema_node(schema or root, root)
    if isinstance(raw, dict):
        known, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, value in raw.items():
            sub = known.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                raw[key] = coerce_exponent_numbers(value, sub, root)
    elif isinstance(raw, list) and isinstance(schema.get("items"), dict):
        raw[:] = [coerce_exponent_numbers(value, schema["items"], root) for value in raw]
    elif isinstance(raw, str) and _EXPONENT_FLOAT.match(raw):
        types = schema.get("type", [])
        if "number" in (types if isinstance(types, list) else [types]):
            return float(raw.replace("_", ""))
    return raw


def bound_problem(key: str, value: float) -> str | None:
    """Why ``value`` breaks the schema's type and bounds for ``key``, or None; "name[]" means an item of a list.

    Command-line options that mirror a config key (``attack --steps`` is ``analysis.steps``) check their values
    here, so the command line and the config accept exactly the same numbers.
    """
    node: dict[str, Any] = load_schema()
    for part in key.split("."):
        node = node["properties"][part.removesuffix("[]")]
        if part.endswith("[]"):
            node = node["items"]
    types = node["type"] if isinstance(node["type"], list) else [node["type"]]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "not a finite number"
    if "integer" in types and "number" not in types and not isinstance(value, int):
        return "not an integer"
    limits = (
        ("minimum", lambda bound: value >= bound, ">="),
        ("exclusiveMinimum", lambda bound: value > bound, ">"),
        ("maximum", lambda bound: value <= bound, "<="),
        ("exclusiveMaximum", lambda bound: value < bound, "<"),
    )
    failed = [f"{sign} {node[name]}" for name, holds, sign in limits if name in node and not holds(node[name])]
    return f"must be {failed[0]} (as config key {key.replace('[]', '')})" if failed else None


def length_problem(key: str, count: int) -> str | None:
    """Why ``count`` values break the schema's length bounds of list ``key`` (for options taking several values)."""
    node: dict[str, Any] = load_schema()
    for part in key.split("."):
        node = node["properties"][part]
    if count > node.get("maxItems", count):
        return f"{count} values, at most {node['maxItems']} allowed (as config key {key})"
    return None


def section_defaults(section: str) -> dict[str, Any]:
    """The schema's defaults of one top-level section: what a config that leaves the section out resolves to.

    Commands that also run without a config file (``attack``, ``samples``) and library functions called without
    settings take their values from here, so the schema stays the only place a default is written.
    """
    schema = load_schema()
    node = {**schema["properties"][section], "$defs": schema.get("$defs", {})}
    instance: dict[str, Any] = {}
    errors = list(_validator_filling_defaults(node).iter_errors(instance))  # fills the defaults as it validates
    if errors:  # the schema's own defaults break its rules: a bug in the schema, not the user's input
        raise ConfigError(f"the schema's defaults of '{section}' are invalid: {_error_line(errors[0])}")
    return instance


def resolve(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a config mapping and fill in the defaults (in place); raise ConfigError naming the key."""
    check_size(raw)  # first: every walk below would expand an alias bomb
    coerce_exponent_numbers(raw)
    bad = _non_finite_key(raw)
    if bad:
        raise ConfigError(f"config key '{bad}': NaN and infinity are not allowed; give a finite number")
    validator = _validator_filling_defaults(load_schema())
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_error_line(errors[0]))
    for name, ds in raw["datasets"].items():
        carl = ds["carl"]
        if carl["start_step"] is not None and carl["start_epoch"] is not None:
            raise ConfigError(f"config key 'datasets.{name}.carl': give start_step or start_epoch, not both")
        if ds["dev_source"] == "official" and name != "sst2":
            raise ConfigError(
                f"config key 'datasets.{name}.dev_source': 'official' exists only for sst2 (GLUE dev); use 'train'"
            )
        if ds["evaluate"] == "test" and ds["per_class"]["test"] == 0:
            raise ConfigError(f"config key 'datasets.{name}.evaluate': 'test' needs per_class.test > 0")
    return raw


@dataclass(frozen=True)
class FreeLBConfig:
    """FreeLB's ascent (paper Table 1). ``adv_steps`` is K, the number of forward-backward passes."""

    init_mag: float = 0.0
    adv_lr: float = 0.01
    adv_max_norm: float = 0.0
    adv_steps: int = 3
    norm_type: Literal["l2", "linf"] = "l2"


@dataclass(frozen=True)
class CarlScheduleConfig:
    start_step: int | None = None
    start_epoch: float | None = None
    negatives: int = 16000


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    per_class: dict[str, Size]
    dev_source: Literal["train", "official"] = "train"
    evaluate: Literal["dev", "test"] = "test"
    files: dict[str, str | list[str]] = field(default_factory=dict)
    batch_size: int = 32
    freelb: FreeLBConfig = field(default_factory=FreeLBConfig)
    carl: CarlScheduleConfig = field(default_factory=CarlScheduleConfig)


@dataclass(frozen=True)
class DataConfig:
    seed: int = 2021
    max_length: int = 128


@dataclass(frozen=True)
class AnalysisConfig:
    """The ``analysis`` section: k-PGD attacks (Tables 4, 5) and text-form samples (Table 6).

    No field has a default of its own: :meth:`defaults` reads the schema's, so the workflow, ``carlrar attack``
    without ``--config`` and :func:`carlrar.attacks.attack_split` called without settings all attack alike.
    """

    datasets: tuple[str, ...] | None
    epsilons: tuple[float, ...]
    steps: int
    step_size_ratio: float
    batch_size: int
    seed: int
    samples_dataset: str | None
    samples_epsilon: float

    @classmethod
    def from_mapping(cls, analysis: dict[str, Any]) -> AnalysisConfig:
        """From a resolved (validated, defaults filled) ``analysis`` mapping; lists become tuples."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in analysis.items()})

    @classmethod
    def defaults(cls) -> AnalysisConfig:
        """The schema's defaults: the paper's attack (SPEC 7) and samples."""
        return cls.from_mapping(section_defaults("analysis"))


@dataclass(frozen=True)
class CarlLossConfig:
    """``training.carl``: CARL's loss (SPEC 4), the same for every dataset; its schedule is per dataset
    (``datasets.<name>.carl``, :class:`CarlScheduleConfig`). Defaults come from the schema only."""

    loss: Literal["nce", "infonce"]
    temperature: float
    momentum: float


@dataclass(frozen=True)
class RarConfig:
    """``training.rar``: RAR's weight w_r (SPEC 5) and the reconstructor warm-up for backbones without an MLM
    head. Defaults come from the schema only."""

    weight: float
    warmup_steps: int
    warmup_learning_rate: float
    warmup_batch_size: int
    warmup_seed: int

    def warmup_settings(self) -> dict[str, Any]:
        """The warm-up's own settings (what a shared warm-up folder must have been made with)."""
        return {key: value for key, value in asdict(self).items() if key.startswith("warmup_")}


@dataclass(frozen=True)
class Config:
    """The resolved configuration. ``raw`` keeps the validated mapping for provenance records."""

    run_name: str
    raw_dir: str
    data: DataConfig
    datasets: dict[str, DatasetConfig]
    model: dict[str, Any]
    training: dict[str, Any]  # the whole section as validated (provenance, run identity); typed views below
    carl: CarlLossConfig
    rar: RarConfig
    analysis: AnalysisConfig
    raw: dict[str, Any]

    def dataset(self, name: str) -> DatasetConfig:
        if name not in self.datasets:
            known = ", ".join(self.datasets) or "none"
            raise ConfigError(f"dataset '{name}' is not in this config's 'datasets' (it has: {known})")
        return self.datasets[name]


def from_mapping(raw: dict[str, Any]) -> Config:
    check_size(raw)  # before the copy, which would expand an alias bomb
    raw = resolve(json.loads(json.dumps(raw)))
    datasets = {
        name: DatasetConfig(
            name=name,
            per_class=dict(ds["per_class"]),
            dev_source=ds["dev_source"],
            evaluate=ds["evaluate"],
            files=dict(ds["files"]),
            batch_size=ds["batch_size"],
            freelb=FreeLBConfig(**ds["freelb"]),
            carl=CarlScheduleConfig(**ds["carl"]),
        )
        for name, ds in raw["datasets"].items()
    }
    return Config(
        run_name=raw["run_name"],
        raw_dir=raw["raw_dir"],
        data=DataConfig(**raw["data"]),
        datasets=datasets,
        model=raw["model"],
        training=raw["training"],
        carl=CarlLossConfig(**raw["training"]["carl"]),
        rar=RarConfig(**raw["training"]["rar"]),
        analysis=AnalysisConfig.from_mapping(raw["analysis"]),
        raw=raw,
    )


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``dotted.key=value`` pairs (values parsed as YAML) in a config mapping, in place.

    Lets one config file drive variations, e.g. a hyperparameter trial:
    ``datasets.sst2.freelb.adv_lr=0.05``.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. datasets.sst2.freelb.adv_lr=0.05)")
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: config key '{part}' holds a value, not a section")
            node = child
        try:
            node[leaf] = parse_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file, apply ``key=value`` overrides, validate and resolve it."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    try:
        return from_mapping(apply_overrides(raw, overrides or []))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
