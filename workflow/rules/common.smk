# Shared set-up: config validation, paths, the grid and every helper function the rules use (the rule files hold
# only rules, so each step reads top to bottom).
import copy
import importlib.util
import json
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

from carlrar import fingerprints, plan
from carlrar.config import ConfigError, coerce_exponent_numbers, from_mapping, read_yaml, resolve
from carlrar.fingerprints import code_fingerprint, digest
from carlrar.prepared import SPLIT_HASHES_FILE
from carlrar.sources import raw_files
from carlrar.storage import write_text


# --- configuration -------------------------------------------------------------------------------------------
# Snakemake's usual rules: a --configfile is merged into config/config.yaml (so a partial file such as
# `training: {seeds: [1]}` changes just that key), `--config key=value` overrides both, and Snakemake's own flag
# `--replace-workflow-config` makes the --configfile(s) replace config/config.yaml: what a whole other config
# (config/smoke.yaml, config/quick.yaml) needs, since merging could add datasets but never remove the paper's.
#
# carlrar's own check first: one line naming the key (snakemake's validate() would print the whole schema), plus
# the rules that span keys (start_step xor start_epoch, official dev only for sst2, ...), as the CLI reports them.
# Snakemake's loader lets the last of two equal keys win (a second `training:` block silently replaces the first)
# and expands YAML aliases without bound, so every config file it read is read again with carlrar's loader, which
# refuses both; resolve() bounds the size before anything walks the mapping. (A config file that is not UTF-8
# fails inside Snakemake's loader, before this file runs, with Snakemake's own UnicodeDecodeError.)
try:
    for path in workflow.configfiles:
        read_yaml(path)
    resolve(copy.deepcopy(config))
except ConfigError as exc:
    raise WorkflowError(f"invalid workflow config: {exc}") from None
coerce_exponent_numbers(config)  # 1e-4 is a number (YAML 1.2), though Snakemake's YAML 1.1 loader reads a string
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
# dataset's section would rerun every job. Instead each job carries two params, and Snakemake's params rerun
# trigger reruns exactly the jobs whose params changed (carlrar.fingerprints, shared with `carlrar train`'s run
# identity and the DVC pipeline):
#   settings: a digest of the config sections the job reads (a train job: the shared sections and its method's
#             parts only, so CARL's temperature reruns carl and carl_rar, not base);
#   code:     a digest of the modules the job runs, blind to comments and docstrings (a train job: its method's
#             modules only, so an edit to contrastive.py reruns no base run).
# The package code is therefore no input file: a comment or docstring edit reruns nothing.
def job_param(rule, name):
    """A params function: the ``name`` digest ("settings" or "code") of this job (carlrar.plan.job_params)."""
    return lambda wildcards: plan.job_params(
        config, rule, wildcards.get("dataset", ""), wildcards.get("method", "")
    )[name]


def _write_resolved_config():
    text = "# Written by the workflow: the validated config with defaults filled in. Do not edit.\n"
    text += yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False)
    path = Path(RESOLVED_CONFIG)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text(path, text)


onstart:
    _write_resolved_config()


# --- paths -------------------------------------------------------------------------------------------------------
def run_dir(dataset, method, seed):
    return f"{RESULTS}/runs/{dataset}/{method}/seed{seed}"


def metrics_files():
    return [f"{run_dir(d, m, s)}/metrics.json" for d, m, s in plan.runs(config)]


TABLE2_PREFIX = f"{RESULTS}/tables/table2_accuracy"
TABLE7_PREFIX = f"{RESULTS}/tables/table7_params"
TABLES = f"{RESULTS}/tables"
FIGURES = f"{RESULTS}/figures"
ROBUSTNESS_TABLES = ["table4_representation", "table5_robustness"]
FIGURE_NAMES = ["robustness_vs_epsilon", "representation_distance", "learning_curves"]


def attack_summaries():
    runs = plan.runs(config, plan.attacked_datasets(config))
    return [f"{RESULTS}/attacks/{d}/{m}/seed{s}/summary.json" for d, m, s in runs]


def sample_reports():
    """Table 6 inputs: the rar / carl_rar runs of analysis.samples_dataset, when base runs exist to judge them."""
    return [f"{RESULTS}/samples/{d}/{m}/seed{s}.json" for d, m, s in plan.sampled_runs(config)]


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


# --- data ---------------------------------------------------------------------------------------------------------
TYPED_CONFIG = from_mapping(config)


def raw_inputs(wildcards):
    """The raw files preparing the dataset reads (none for a split read from the hub): a corrected file reruns it."""
    return [str(path) for path in raw_files(TYPED_CONFIG.datasets[wildcards.dataset], config["raw_dir"])]


def prepared_data(wildcards):
    """The dataset's splits_sha256.json, the data input of every training, warm-up and attack job.

    It holds only the splits' content hashes (not the manifest's provenance: source files, versions), so a
    re-prepare that samples the same rows leaves it the same. `prepare` is a checkpoint: when its folder exists
    and the job reruns (edited data code, a corrected raw file), the jobs that read it are planned again only
    after it has finished; then Snakemake sees that the small file's checksum did not change and reruns nothing
    downstream, within one call as across calls. A dataset not yet prepared is an ordinary dependency, so a dry
    run of a fresh clone still lists every job.
    """
    path = f"{PROCESSED}/{wildcards.dataset}/{SPLIT_HASHES_FILE}"
    if Path(path).is_file():
        return checkpoints.prepare.get(dataset=wildcards.dataset).output.hashes
    return path


def after_prepare(paths):
    """An input function giving ``paths`` once every prepared dataset's checkpoint is settled.

    For the jobs that gather runs (tables, figures): were they planned before a re-prepare finished, Snakemake
    would rerun them for training that the identical splits then do not rerun.
    """

    def inputs(wildcards):
        for dataset in DATASETS:
            if Path(f"{PROCESSED}/{dataset}/{SPLIT_HASHES_FILE}").is_file():
                checkpoints.prepare.get(dataset=dataset)
        return paths

    return inputs


def data_dir(wildcards, input):
    """A params function: the prepared folder of the job's data input."""
    return str(Path(input.data).parent)


# --- RAR's reconstructor warm-up ------------------------------------------------------------------------------------
RAR_WARMUP = f"{RESULTS}/rar_warmup"


def rar_warmup_input(wildcards):
    """rar and carl_rar start from the dataset's reconstructor warm-up when training.rar.warmup_steps > 0."""
    if wildcards.method in plan.reconstruction_methods(config) and wildcards.dataset in plan.warmup_datasets(config):
        return {"warmup": f"{RAR_WARMUP}/{wildcards.dataset}/warmup.json"}
    return {}


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


def hpsearch_settings(wildcards):
    """As train_settings for the search's method, at the search's epochs and without the searched values (they are
    in the path): a changed grid adds or drops trials without rerunning the others."""
    searched = copy.deepcopy(config)
    if HPSEARCH["epochs"] is not None:
        searched["training"]["epochs"] = HPSEARCH["epochs"]
    freelb = searched["datasets"][wildcards.dataset].get("freelb", {})
    searched["datasets"][wildcards.dataset]["freelb"] = {k: v for k, v in freelb.items() if k not in HP_PARAMS}
    return digest(fingerprints.method_settings(searched, wildcards.dataset, HP_METHOD))


def hpsearch_code(wildcards):
    return code_fingerprint(plan.TRAINING_ENTRY, HP_METHOD)


# --- output folders given to the commands (derived from the outputs, as `snakemake --lint` asks) -------------------
def parent_of(name):
    """A params function: the folder of output ``name``."""
    return lambda wildcards, output: str(Path(output[name]).parent)


def prefix_of(name):
    """A params function: output ``name`` without its extension (the commands add .md, .csv, .tex)."""
    return lambda wildcards, output: str(Path(output[name]).with_suffix(""))
