# Training: one job per (dataset, method, seed) of the config grid; each writes its run folder with metrics.json.
# Device selection (which GPU, or the CPU) happens inside `carlrar train`: on a local machine each GPU job leases
# one of CARLRAR_GPU_SLOTS slots of a free GPU (resources gpu_slots); inside a SLURM job, a slot of that job's GPUs.
# `gpu=1` lets Snakemake cap the GPU jobs of one machine (`--resources gpu=N`) or request a GPU per SLURM job.
# Memory and runtime below are defaults for a paper-size ALBERT-base run; profiles override them (set-resources).


# RAR's reconstructor warm-up (a backbone without a pretrained MLM head, e.g. MiniLM): once per dataset, shared
# by the rar and carl_rar runs of every seed.
rule rar_warmup:
    input:
        data=prepared_data,
    output:
        record=f"{RAR_WARMUP}/{{dataset}}/warmup.json",
    params:
        config=RESOLVED_CONFIG,
        data=data_dir,
        out=parent_of("record"),
        settings=job_param("rar_warmup", "settings"),
        code=job_param("rar_warmup", "code"),
    log:
        f"{LOGS}/rar_warmup/{{dataset}}.log",
    benchmark:
        f"{BENCHMARKS}/rar_warmup/{{dataset}}.tsv"
    conda:
        "../envs/carlrar.yaml"
    threads: 4
    resources:
        gpu=1,
        gpu_slots=1,
        mem_mb=16000,
        runtime=30,
    shell:
        "OMP_NUM_THREADS={threads} CARLRAR_GPU_SLOTS={resources.gpu_slots} carlrar rar-warmup"
        " --config {params.config:q} --dataset {wildcards.dataset} --data {params.data:q} --out {params.out:q}"
        " > {log:q} 2>&1"


# --restart-if-changed: the job reruns when its params (settings and code digests) or data change; the run folder's
# checkpoint is then discarded if other settings or other code wrote it (the run identity holds both digests), and
# resumed if it is this run's own (a preempted or killed job), so a run never continues weights of other settings
# and a code fix always reaches the weights.
rule train:
    input:
        # Only the splits' content hashes, not the parquet files or the manifest: a small file whose checksum
        # Snakemake compares, so a re-prepare that yields identical splits reruns no training.
        unpack(rar_warmup_input),
        data=prepared_data,
    output:
        metrics=f"{RESULTS}/runs/{{dataset}}/{{method}}/seed{{seed}}/metrics.json",
    params:
        config=RESOLVED_CONFIG,
        data=data_dir,
        out=parent_of("metrics"),
        settings=job_param("train", "settings"),
        rar_warmup=rar_warmup_flag,
        code=job_param("train", "code"),
    log:
        f"{LOGS}/train/{{dataset}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/train/{{dataset}}/{{method}}/seed{{seed}}.tsv"
    conda:
        "../envs/carlrar.yaml"
    threads: 4
    resources:
        gpu=1,
        gpu_slots=1,
        mem_mb=32000,
        runtime=720,  # minutes; a paper-size ALBERT-base run takes a few hours on one GPU
    shell:
        "OMP_NUM_THREADS={threads} CARLRAR_GPU_SLOTS={resources.gpu_slots} carlrar train"
        " --config {params.config:q} --dataset {wildcards.dataset} --method {wildcards.method}"
        " --seed {wildcards.seed} --data {params.data:q} --out {params.out:q} --restart-if-changed"
        " {params.rar_warmup} > {log:q} 2>&1"
