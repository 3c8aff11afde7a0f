# Shared set-up: config validation, paths, the grid and the helpers the rules use.
import copy
import hashlib
import json
import re
from importlib import resources
from pathlib import Path

import yaml

import carlrar
from carlrar.config import ConfigError, coerce_exponent_numbers, resolve
from carlrar.storage import write_text
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate


# --- configuration -------------------------------------------------------------------------------------------
# Snakemake's default *merges* a --configfile into config/config.yaml, so `--configfile config/smoke.yaml` would
# keep the paper's four datasets beside the smoke one. A config file named on the command line therefore
# replaces config/config.yaml, as `--replace-workflow-config` does; `--config key=value` still overrides both.
if workflow.overwrite_configfiles and not workflow.config_settings.replace_workflow_config:
    config.clear()
    config.update(copy.deepcopy(workflow.config_settings.overwrite_config))
    logger.info(f"Using only the config file(s) given on the command line: {', '.join(map(str, workflow.overwrite_configfiles))}")

# carlrar's own check first: one line naming the key (snakemake's validate() would print the whole schema), plus
# the rules that span keys (start_step xor start_epoch, official dev only for sst2, ...), as the CLI reports them.
coerce_exponent_numbers(config)  # 1e-4 is a number (YAML 1.2), though Snakemake's YAML 1.1 loader reads a string
try:
    resolve(copy.deepcopy(config))
except ConfigError as exc:
    raise WorkflowError(f"invalid workflow config: {exc}") from None
# Then the standard validation against the same schema, which fills in the defaults. The package's own schema
# (not a path relative to this file), so the workflow also runs from a copy of Snakefile + workflow/ + config/.
SCHEMA = resources.files("carlrar").joinpath("schemas/config.schema.json")
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
# and rewritten only when its content changes). It is deliberately *not* a rule input: then an edit of one
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
# (small files: Snakemake compares checksums, so only a real edit reruns). A method's regulariser module counts
# only for the methods that use it. Modules come from the installed package (editable install: src/carlrar/).
PACKAGE_DIR = Path(carlrar.__file__).resolve().parent
DATA_CODE = ["data.py", "config.py", "storage.py", "errors.py"]
TRAIN_CODE = [*DATA_CODE, "models.py", "adversary.py", "training.py", "identity.py", "devices.py"]
METHOD_CODE = {"carl": ["contrastive.py"], "rar": ["reconstruction.py"],
               "carl_rar": ["contrastive.py", "reconstruction.py"]}
TABLE_CODE = ["reporting.py"]
ATTACK_CODE = ["attacks.py", "training.py", "models.py", "reconstruction.py", "data.py"]


def code_inputs(names):
    paths = [PACKAGE_DIR / name for name in names]
    return [str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p) for p in paths]


def train_code(wildcards):
    return code_inputs(TRAIN_CODE + METHOD_CODE.get(wildcards.method, []))


# --- paths -------------------------------------------------------------------------------------------------------
def data_dir(dataset):
    return f"{PROCESSED}/{dataset}"


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


ATTACKED = [d for d in DATASETS if config["analysis"]["datasets"] is None or d in config["analysis"]["datasets"]]


def attack_summaries():
    return [f"{RESULTS}/attacks/{d}/{m}/seed{s}/summary.json" for d in ATTACKED for m in METHODS for s in SEEDS]


def sample_reports():
    """Table 6 inputs: the rar / carl_rar runs of analysis.samples_dataset, when base runs exist to judge them."""
    dataset = config["analysis"]["samples_dataset"]
    if dataset not in DATASETS or "base" not in METHODS:
        return []
    return [f"{RESULTS}/samples/{dataset}/{m}/seed{s}.json" for m in METHODS if m in ("rar", "carl_rar") for s in SEEDS]


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
