# Data stage: sample each dataset's train/dev/test splits (paper Table 9) once; every method and seed reads them.
# `carlrar prepare` writes the folder atomically; its manifest.json records the splits' content hashes.
# A checkpoint, so that a re-prepare yielding identical splits reruns nothing downstream (see prepared_manifest).


checkpoint prepare:
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
        out=parent_of("manifest"),
        fingerprint=prepare_fingerprint,
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
