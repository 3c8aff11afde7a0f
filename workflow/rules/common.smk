# Shared set-up: config validation, paths, the grid and every helper function the rules use (the rule files hold
# only rules, so each step reads top to bottom).
import ast
import copy
import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import yaml

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

# The workflow is parsed by the Python that runs Snakemake, which need not have carlrar installed (with
# `--sdm conda` only the rules' environment, workflow/envs/carlrar.yaml, has it). Parsing imports only light
# modules (config, registry, storage, hpsearch's grid: pyyaml and jsonschema, which Snakemake itself needs; no
# torch, transformers or scipy), so it falls back to this repository's src/ folder.
REPO_SRC = Path(workflow.basedir) / "src"
if importlib.util.find_spec("carlrar") is None:
    sys.path.insert(0, str(REPO_SRC))
    logger.info(f"carlrar is not installed in Snakemake's Python; parsing with {REPO_SRC}")

from carlrar.config import ConfigError, coerce_exponent_numbers, resolve
from carlrar.registry import CONTRASTIVE_METHODS, RECONSTRUCTION_METHODS
from carlrar.storage import write_text


# --- configuration -------------------------------------------------------------------------------------------
# Snakemake's usual rules: a --configfile is merged into config/config.yaml (so a partial file such as
# `training: {seeds: [1]}` changes just that key), `--config key=value` overrides both, and Snakemake's own flag
# `--replace-workflow-config` makes the --configfile(s) replace config/config.yaml: what a whole other config
# (config/smoke.yaml, config/quick.yaml) needs, since merging could add datasets but never remove the paper's.
#
# carlrar's own check first: one line naming the key (snakemake's validate() would print the whole schema), plus
# the rules that span keys (start_step xor start_epoch, official dev only for sst2, ...), as the CLI reports them.
coerce_exponent_numbers(config)  # 1e-4 is a number (YAML 1.2), though Snakemake's YAML 1.1 loader reads a string
try:
    resolve(copy.deepcopy(config))
except ConfigError as exc:
    raise WorkflowError(f"invalid workflow config: {exc}") from None
# Then the standard validation against the same schema, which fills in the defaults. The package's own schema
# (installed or src/), so the workflow also runs from a copy of Snakefile + workflow/ + config/.
SCHEMA = Path(importlib.util.find_spec("carlrar").origin).parent / "schemas" / "config.schema.json"
validate(config, str(SCHEMA))

RUN = config["run_name"]
DATASETS = list(config["datasets"])
METHODS = list(config["training"]["methods"])
SEEDS = [int(s) for s in config["training"]["seeds"]]

PROCESSED = f"data/processed/{RUN}"
RESULTS = f"results/{RUN}"
LOGS = f"{RESULTS}/logs"
BENCHMARKS = f"{RESULTS}/benchmarks"
# The resolved config (defaults filled, command-line overrides applied) that every `carlrar` call reads.
RESOLVED_CONFIG = f"{RESULTS}/config.yaml"


def _alternatives(values):
    return "|".join(re.escape(str(v)) for v in values)


wildcard_constraints:
    dataset=_alternatives(DATASETS),
    method=_alternatives(METHODS),
    seed=_alternatives(SEEDS),


# --- the resolved config file and what triggers reruns -------------------------------------------------------
# `carlrar` reads one YAML file, but the workflow config may come from several files plus --config overrides,
# so the resolved mapping is written to RESOLVED_CONFIG when a real run starts (onstart: not in dry runs,
# and rewritten only when its content changes). It is deliberately not an input of the jobs: then an edit of one
# dataset's section would rerun every job. Instead each rule carries, as a param, a fingerprint of exactly the
# config sections it reads, and Snakemake's params rerun trigger reruns just the affected jobs.
def _fingerprint(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_fingerprint(wildcards):
    return _fingerprint(
        {"raw_dir": config["raw_dir"], "data": config["data"], "dataset": config["datasets"][wildcards.dataset]}
    )


def train_fingerprint(wildcards):
    # training.seeds and training.methods only shape the grid; a new seed or method must not rerun old runs
    training = {k: v for k, v in config["training"].items() if k not in ("seeds", "methods")}
    return _fingerprint(
        {"model": config["model"], "training": training, "data": config["data"],
         "dataset": config["datasets"][wildcards.dataset]}
    )


# The analysis keys each command reads (analysis.datasets and samples_dataset only shape the grid).
ATTACK_SETTINGS = ("epsilons", "steps", "step_size_ratio", "batch_size", "seed")
SAMPLES_SETTINGS = ("samples_epsilon", "steps", "step_size_ratio", "batch_size", "seed")


def attack_fingerprint(wildcards):
    return _fingerprint({key: config["analysis"][key] for key in ATTACK_SETTINGS})


def samples_fingerprint(wildcards):
    return _fingerprint({key: config["analysis"][key] for key in SAMPLES_SETTINGS})


def _write_resolved_config():
    text = "# Written by the workflow: the validated config with defaults filled in. Do not edit.\n"
    text += yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False)
    path = Path(RESOLVED_CONFIG)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text(path, text)


onstart:
    _write_resolved_config()


# --- code dependencies -----------------------------------------------------------------------------------------
# Snakemake does not track the code a shell rule calls, so the package modules each step runs are its inputs
# (small files: Snakemake compares checksums, so only a real edit reruns). They are read from the imports: the
# step's entry module and every carlrar module it imports, directly or not (carlrar.cli, which only dispatches,
# is left out). A method's regulariser module counts only for the methods that use it.
PACKAGE_DIR = Path(importlib.util.find_spec("carlrar").origin).parent
REGULARISER_MODULES = {"contrastive.py": CONTRASTIVE_METHODS, "reconstruction.py": RECONSTRUCTION_METHODS}


def _carlrar_imports(module_file):
    """The carlrar modules one source file imports (at any depth of the file: lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(module_file.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "carlrar" and len(parts) > 1 and (PACKAGE_DIR / f"{parts[1]}.py").is_file():
                found.add(f"{parts[1]}.py")
    return found


def module_closure(*entries):
    """The entry modules and every carlrar module they import, transitively, as sorted file names."""
    seen, todo = set(), [e for e in entries]
    while todo:
        name = todo.pop()
        if name not in seen and name != "cli.py":
            seen.add(name)
            todo.extend(_carlrar_imports(PACKAGE_DIR / name))
    return sorted(seen)


def code_inputs(modules):
    paths = [PACKAGE_DIR / name for name in modules]
    return [str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p) for p in paths]


DATA_CODE = module_closure("data.py")
TRAIN_CODE = module_closure("training.py")
WARMUP_CODE = module_closure("rar_warmup.py")
ATTACK_CODE = module_closure("attacks.py")
TABLE_CODE = module_closure("reporting.py")
PAIRED_CODE = module_closure("paired.py")
FIGURE_CODE = module_closure("figures.py")
HPSEARCH_SELECT_CODE = module_closure("hpsearch.py")


def method_code(method):
    """The training code of one method: the regulariser modules of the other methods do not count."""
    return code_inputs([m for m in TRAIN_CODE if method in REGULARISER_MODULES.get(m, (method,))])


def train_code(wildcards):
    return method_code(wildcards.method)


# --- paths -------------------------------------------------------------------------------------------------------
def run_dir(dataset, method, seed):
    return f"{RESULTS}/runs/{dataset}/{method}/seed{seed}"


def metrics_files():
    return [f"{run_dir(d, m, s)}/metrics.json" for d in DATASETS for m in METHODS for s in SEEDS]


TABLE2_PREFIX = f"{RESULTS}/tables/table2_accuracy"
TABLE7_PREFIX = f"{RESULTS}/tables/table7_params"
TABLES = f"{RESULTS}/tables"
FIGURES = f"{RESULTS}/figures"
ROBUSTNESS_TABLES = ["table4_representation", "table5_robustness"]
FIGURE_NAMES = ["robustness_vs_epsilon", "representation_distance", "learning_curves"]


ANALYSIS = config["analysis"]
ATTACKED = [d for d in DATASETS if ANALYSIS["datasets"] is None or d in ANALYSIS["datasets"]]


def attack_summaries():
    return [f"{RESULTS}/attacks/{d}/{m}/seed{s}/summary.json" for d in ATTACKED for m in METHODS for s in SEEDS]


def sample_reports():
    """Table 6 inputs: the rar / carl_rar runs of analysis.samples_dataset, when base runs exist to judge them."""
    dataset = ANALYSIS["samples_dataset"]
    if dataset not in DATASETS or "base" not in METHODS:
        return []
    methods = [m for m in METHODS if m in RECONSTRUCTION_METHODS]
    return [f"{RESULTS}/samples/{dataset}/{m}/seed{s}.json" for m in methods for s in SEEDS]


if sample_reports():
    ROBUSTNESS_TABLES.append("table6_samples")


def table_files():
    """Every table and figure of the run: Tables 2 and 7 from the training runs, 4-6 and figures from attacks."""
    return (
        [f"{TABLE2_PREFIX}.{ext}" for ext in ("md", "csv", "tex")]
        + [f"{TABLE7_PREFIX}.{ext}" for ext in ("md", "csv")]
        + [f"{TABLES}/{name}.{ext}" for name in ROBUSTNESS_TABLES for ext in ("md", "csv", "tex")]
        + [f"{TABLES}/table_paired.{ext}" for ext in ("md", "csv", "tex")]
        + [f"{FIGURES}/{name}.{ext}" for name in FIGURE_NAMES for ext in ("pdf", "png")]
    )


# --- prepared data ------------------------------------------------------------------------------------------------
def prepared_manifest(wildcards):
    """The dataset's manifest.json, the data input of every training and attack job.

    `prepare` is a checkpoint. When its folder already exists and the job reruns (edited data code, new raw
    files), the jobs that read it are planned again only after it has finished: then Snakemake sees whether the
    manifest, which holds the splits' content hashes, really changed (it compares checksums of small files), so
    identical splits rerun no training or attack, within one call as across calls. A dataset not yet prepared is
    an ordinary dependency, so a dry run of a fresh clone still lists every job.
    """
    path = f"{PROCESSED}/{wildcards.dataset}/manifest.json"
    if Path(path).is_file():
        return checkpoints.prepare.get(dataset=wildcards.dataset).output.manifest
    return path


# --- RAR's reconstructor warm-up ------------------------------------------------------------------------------------
RAR_WARMUP = f"{RESULTS}/rar_warmup"


def rar_warmup_input(wildcards):
    """rar and carl_rar start from the dataset's reconstructor warm-up when training.rar.warmup_steps > 0."""
    if wildcards.method in RECONSTRUCTION_METHODS and config["training"]["rar"]["warmup_steps"]:
        return {"warmup": f"{RAR_WARMUP}/{wildcards.dataset}/warmup.json"}
    return {}


def rar_warmup_fingerprint(wildcards):
    rar = {k: v for k, v in config["training"]["rar"].items() if k.startswith("warmup_")}
    return _fingerprint({"model": config["model"], "rar": rar, "data": config["data"],
                         "eval_batch_size": config["training"]["eval_batch_size"]})


def rar_warmup_flag(wildcards, input):
    return f"--rar-warmup {Path(input.warmup).parent}" if "warmup" in input.keys() else ""


# --- FreeLB's hyperparameter search ---------------------------------------------------------------------------------
from carlrar.hpsearch import PARAMS as HP_PARAMS, grid_trials

HPSEARCH = config["hpsearch"]
try:
    # Table 8's bounds: an out-of-bounds grid value stops every call with one line naming the key and the bound
    HP_TRIALS = {trial.id: trial for trial in grid_trials(HPSEARCH)}
except ConfigError as exc:
    raise WorkflowError(f"invalid workflow config: {exc}") from None
HP_SEEDS = [int(s) for s in HPSEARCH["seeds"]]
HP_METHOD = HPSEARCH["method"]
HPSEARCH_DIR = f"{RESULTS}/hpsearch"


def hpsearch_metrics_files():
    return [f"{HPSEARCH_DIR}/{d}/{t}/seed{s}/metrics.json" for d in DATASETS for t in HP_TRIALS for s in HP_SEEDS]


def hpsearch_overrides(wildcards):
    overrides = HP_TRIALS[wildcards.trial].overrides(wildcards.dataset, HPSEARCH["epochs"])
    return " ".join(f"--set {item}" for item in overrides)


def hpsearch_fingerprint(wildcards):
    # as train_fingerprint, minus the searched values (they are in the path) plus the search's method and epochs;
    # a changed grid adds or drops trials without rerunning the others
    training = {k: v for k, v in config["training"].items() if k not in ("seeds", "methods")}
    if HPSEARCH["epochs"] is not None:
        training["epochs"] = HPSEARCH["epochs"]
    dataset = copy.deepcopy(config["datasets"][wildcards.dataset])
    dataset["freelb"] = {k: v for k, v in dataset.get("freelb", {}).items() if k not in HP_PARAMS}
    return _fingerprint(
        {"model": config["model"], "training": training, "data": config["data"], "dataset": dataset,
         "method": HP_METHOD}
    )


# --- output folders given to the commands (derived from the outputs, as `snakemake --lint` asks) -------------------
def parent_of(name):
    """A params function: the folder of output ``name``."""
    return lambda wildcards, output: str(Path(output[name]).parent)


def prefix_of(name):
    """A params function: output ``name`` without its extension (the commands add .md, .csv, .tex)."""
    return lambda wildcards, output: str(Path(output[name]).with_suffix(""))
