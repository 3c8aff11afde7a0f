# Data stage: sample each dataset's train/dev/test splits (paper Table 9) once; every method and seed reads them.
# `carlrar prepare` writes the folder atomically; splits_sha256.json holds just the splits' content hashes.
# A checkpoint, so that a re-prepare yielding identical splits reruns nothing downstream (see prepared_data).


checkpoint prepare:
    input:
        raw=raw_inputs,  # the raw files sampled from: a corrected one reruns prepare
    output:
        train=f"{PROCESSED}/{{dataset}}/train.parquet",
        dev=f"{PROCESSED}/{{dataset}}/dev.parquet",
        test=f"{PROCESSED}/{{dataset}}/test.parquet",
        manifest=f"{PROCESSED}/{{dataset}}/manifest.json",
        hashes=f"{PROCESSED}/{{dataset}}/{SPLIT_HASHES_FILE}",
    params:
        config=RESOLVED_CONFIG,
        raw_dir=config["raw_dir"],
        out=parent_of("manifest"),
        settings=job_param("prepare", "settings"),
        code=job_param("prepare", "code"),
    log:
        f"{LOGS}/prepare/{{dataset}}.log",
    benchmark:
        f"{BENCHMARKS}/prepare/{{dataset}}.tsv"
    conda:
        "../envs/carlrar.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=16000,  # large raw CSVs (Yahoo! Answers: 1.4 M rows) are read whole
        runtime=60,
    shell:
        "carlrar prepare --config {params.config:q} --dataset {wildcards.dataset} --raw-dir {params.raw_dir:q}"
        " --out {params.out:q} > {log:q} 2>&1"
