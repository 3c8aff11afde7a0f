# FreeLB's hyperparameter search (paper A.2, Table 8): `snakemake hpsearch ...`; not part of the default target.
# One training run per (dataset, trial, seed) of the config's hpsearch grid, each trial's values handed to
# `carlrar train` with --set; then `carlrar hpsearch-select` picks the best trial per dataset on mean dev accuracy
# and writes results/<run>/hpsearch/{<dataset>/best.yaml, freelb_best.yaml, trials.md, trials.csv}. To use the
# choice: snakemake --configfile config/config.yaml results/<run>/hpsearch/freelb_best.yaml (files merge in order).
# Only the coarse grid of the paper's search is automated; its manual fine-tuning is a narrower grid of your own.
from carlrar.hpsearch import PARAMS, grid_trials

HPSEARCH = config["hpsearch"]
try:
    # Table 8's bounds: an out-of-bounds grid value stops every call with one line naming the key and the bound
    HP_TRIALS = {trial.id: trial for trial in grid_trials(HPSEARCH)}
except ConfigError as exc:
    raise WorkflowError(f"invalid workflow config: {exc}") from None
HP_SEEDS = [int(s) for s in HPSEARCH["seeds"]]
HP_METHOD = HPSEARCH["method"]
HPSEARCH_DIR = f"{RESULTS}/hpsearch"


def hpsearch_run_dir(dataset, trial, seed):
    return f"{HPSEARCH_DIR}/{dataset}/{trial}/seed{seed}"


def hpsearch_metrics_files():
    return [f"{hpsearch_run_dir(d, t, s)}/metrics.json" for d in DATASETS for t in HP_TRIALS for s in HP_SEEDS]


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
    dataset["freelb"] = {k: v for k, v in dataset.get("freelb", {}).items() if k not in PARAMS}
    return _fingerprint(
        {"model": config["model"], "training": training, "data": config["data"], "dataset": dataset,
         "method": HP_METHOD}
    )


rule hpsearch_train:
    input:
        manifest=f"{PROCESSED}/{{dataset}}/manifest.json",
        code=code_inputs(TRAIN_CODE + METHOD_CODE.get(HP_METHOD, [])),
    output:
        metrics=f"{HPSEARCH_DIR}/{{dataset}}/{{trial}}/seed{{seed}}/metrics.json",
    wildcard_constraints:
        # rule-level constraints replace the global ones: the search has its own seeds
        trial=_alternatives(HP_TRIALS),
        seed=_alternatives(HP_SEEDS),
    params:
        config=RESOLVED_CONFIG,
        method=HP_METHOD,
        data=lambda wildcards: data_dir(wildcards.dataset),
        out=lambda wildcards: hpsearch_run_dir(wildcards.dataset, wildcards.trial, wildcards.seed),
        overrides=hpsearch_overrides,
        fingerprint=hpsearch_fingerprint,
    log:
        f"{LOGS}/hpsearch/{{dataset}}/{{trial}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/hpsearch/{{dataset}}/{{trial}}/seed{{seed}}.tsv"
    threads: 4
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} carlrar train --config {params.config:q} --dataset {wildcards.dataset}"
        " --method {params.method} --seed {wildcards.seed} --data {params.data:q} --out {params.out:q}"
        " --restart-if-changed {params.overrides} > {log:q} 2>&1"


rule hpsearch_select:
    input:
        metrics=hpsearch_metrics_files(),
        code=code_inputs(["hpsearch.py", "reporting.py", "storage.py"]),
    output:
        best=[f"{HPSEARCH_DIR}/{d}/best.yaml" for d in DATASETS],
        combined=f"{HPSEARCH_DIR}/freelb_best.yaml",
        md=f"{HPSEARCH_DIR}/trials.md",
        csv=f"{HPSEARCH_DIR}/trials.csv",
    params:
        out_dir=HPSEARCH_DIR,
    log:
        f"{LOGS}/hpsearch/select.log",
    localrule: True
    shell:
        "carlrar hpsearch-select --metrics {input.metrics:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule hpsearch:
    input:
        rules.hpsearch_select.output,
    localrule: True
