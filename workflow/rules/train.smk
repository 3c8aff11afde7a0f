# Training: one job per (dataset, method, seed) of the config grid; each writes its run folder with metrics.json.
# Device selection (which GPU, or the CPU) happens inside `carlrar train`; `gpu=1` lets the scheduler cap how
# many runs share the machine (`--resources gpu=N`) or request one GPU per job on SLURM.


rule train:
    input:
        # Only the manifest, not the parquet files: it is small, so Snakemake compares its checksum, and it holds
        # the splits' content hashes. A re-prepare that yields identical splits therefore reruns no training.
        manifest=f"{PROCESSED}/{{dataset}}/manifest.json",
        code=train_code,
    output:
        metrics=f"{RESULTS}/runs/{{dataset}}/{{method}}/seed{{seed}}/metrics.json",
    params:
        config=RESOLVED_CONFIG,
        data=lambda wildcards: data_dir(wildcards.dataset),
        out=lambda wildcards: run_dir(wildcards.dataset, wildcards.method, wildcards.seed),
        fingerprint=train_fingerprint,
    log:
        f"{LOGS}/train/{{dataset}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/train/{{dataset}}/{{method}}/seed{{seed}}.tsv"
    threads: 4
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} carlrar train --config {params.config:q} --dataset {wildcards.dataset}"
        " --method {wildcards.method} --seed {wildcards.seed} --data {params.data:q} --out {params.out:q}"
        " > {log:q} 2>&1"
