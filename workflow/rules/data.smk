# Data stage: sample each dataset's train/dev/test splits (paper Table 9) once; every method and seed reads them.
# `carlrar prepare` writes the folder atomically; its manifest.json records the splits' content hashes.


rule prepare:
    input:
        code=code_inputs(DATA_CODE),
    output:
        train=f"{PROCESSED}/{{dataset}}/train.parquet",
        dev=f"{PROCESSED}/{{dataset}}/dev.parquet",
        test=f"{PROCESSED}/{{dataset}}/test.parquet",
        manifest=f"{PROCESSED}/{{dataset}}/manifest.json",
    params:
        config=RESOLVED_CONFIG,
        raw_dir=config["raw_dir"],
        out=lambda wildcards: data_dir(wildcards.dataset),
        fingerprint=prepare_fingerprint,
    log:
        f"{LOGS}/prepare/{{dataset}}.log",
    benchmark:
        f"{BENCHMARKS}/prepare/{{dataset}}.tsv"
    threads: 1
    shell:
        "carlrar prepare --config {params.config:q} --dataset {wildcards.dataset} --raw-dir {params.raw_dir:q}"
        " --out {params.out:q} > {log:q} 2>&1"
