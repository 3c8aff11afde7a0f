# FreeLB's hyperparameter search (paper A.2, Table 8): `snakemake hpsearch ...`; not part of the default target.
# One training run per (dataset, trial, seed) of the config's hpsearch grid, each trial's values handed to
# `carlrar train` with --set; then `carlrar hpsearch-select` picks the best trial per dataset on mean dev accuracy
# and writes results/<run>/hpsearch/{<dataset>/best.yaml, freelb_best.yaml, trials.md, trials.csv}. To use the
# choice: `snakemake --configfile results/<run>/hpsearch/freelb_best.yaml` (merged into config/config.yaml).
# Only the coarse grid of the paper's search is automated; its manual fine-tuning is a narrower grid of your own.
# The grid, trial ids, overrides and fingerprint are built in common.smk.


rule hpsearch_train:
    input:
        data=prepared_data,
    output:
        metrics=f"{HPSEARCH_DIR}/{{dataset}}/{{trial}}/seed{{seed}}/metrics.json",
    wildcard_constraints:
        # rule-level constraints replace the global ones: the search has its own seeds
        trial=_alternatives(HP_TRIALS),
        seed=_alternatives(HP_SEEDS),
    params:
        config=RESOLVED_CONFIG,
        method=HP_METHOD,
        data=data_dir,
        out=parent_of("metrics"),
        overrides=hpsearch_overrides,
        settings=hpsearch_settings,
        code=hpsearch_code,
    log:
        f"{LOGS}/hpsearch/{{dataset}}/{{trial}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/hpsearch/{{dataset}}/{{trial}}/seed{{seed}}.tsv"
    conda:
        "../envs/carlrar.yaml"
    threads: 4
    resources:
        gpu=1,
        gpu_slots=1,
        mem_mb=32000,
        runtime=720,
    shell:
        "OMP_NUM_THREADS={threads} CARLRAR_GPU_SLOTS={resources.gpu_slots} carlrar train"
        " --config {params.config:q} --dataset {wildcards.dataset} --method {params.method} --seed {wildcards.seed} --data {params.data:q} --out {params.out:q}"
        " --restart-if-changed {params.overrides} > {log:q} 2>&1"


rule hpsearch_select:
    input:
        metrics=after_prepare(hpsearch_metrics_files()),
    output:
        best=[f"{HPSEARCH_DIR}/{d}/best.yaml" for d in DATASETS],
        combined=f"{HPSEARCH_DIR}/freelb_best.yaml",
        md=f"{HPSEARCH_DIR}/trials.md",
        csv=f"{HPSEARCH_DIR}/trials.csv",
    params:
        out_dir=lambda wildcards, output: str(Path(output.combined).parent),
        code=code_fingerprint("hpsearch.py"),
    log:
        f"{LOGS}/hpsearch/select.log",
    conda:
        "../envs/carlrar.yaml"
    localrule: True
    shell:
        "carlrar hpsearch-select --metrics {input.metrics:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule hpsearch:
    input:
        rules.hpsearch_select.output,
    localrule: True
