# Training: one job per (dataset, method, seed) of the config grid; each writes its run folder with metrics.json.
# Device selection (which GPU, or the CPU) happens inside `carlrar train`; `gpu=1` lets the scheduler cap how
# many runs share the machine (`--resources gpu=N`) or request one GPU per job on SLURM.


RAR_WARMUP = f"{RESULTS}/rar_warmup"


def rar_warmup_input(wildcards):
    """rar and carl_rar start from the dataset's reconstructor warm-up when training.rar.warmup_steps > 0."""
    if wildcards.method in ("rar", "carl_rar") and config["training"]["rar"]["warmup_steps"]:
        return {"warmup": f"{RAR_WARMUP}/{wildcards.dataset}/warmup.json"}
    return {}


def rar_warmup_fingerprint(wildcards):
    rar = {k: v for k, v in config["training"]["rar"].items() if k.startswith("warmup_")}
    return _fingerprint({"model": config["model"], "rar": rar, "data": config["data"],
                         "eval_batch_size": config["training"]["eval_batch_size"]})


def rar_warmup_flag(wildcards, input):
    return f"--rar-warmup {Path(input.warmup).parent}" if "warmup" in input.keys() else ""


# RAR's reconstructor warm-up (a backbone without a pretrained MLM head, e.g. MiniLM): once per dataset, shared
# by the rar and carl_rar runs of every seed.
rule rar_warmup:
    input:
        manifest=f"{PROCESSED}/{{dataset}}/manifest.json",
        code=code_inputs(TRAIN_CODE + ["reconstruction.py"]),
    output:
        record=f"{RAR_WARMUP}/{{dataset}}/warmup.json",
    params:
        config=RESOLVED_CONFIG,
        data=lambda wildcards: data_dir(wildcards.dataset),
        out=lambda wildcards, output: str(Path(output.record).parent),
        fingerprint=rar_warmup_fingerprint,
    log:
        f"{LOGS}/rar_warmup/{{dataset}}.log",
    benchmark:
        f"{BENCHMARKS}/rar_warmup/{{dataset}}.tsv"
    threads: 4
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} carlrar rar-warmup --config {params.config:q} --dataset {wildcards.dataset}"
        " --data {params.data:q} --out {params.out:q} > {log:q} 2>&1"


# --restart-if-changed: the job reruns when its params (the config fingerprint), code or data change; the run folder's
# checkpoint is then discarded if another configuration wrote it, and resumed if it is this configuration's own
# (a preempted or killed job), so a run never continues weights of other settings.
rule train:
    input:
        # Only the manifest, not the parquet files: it is small, so Snakemake compares its checksum, and it holds
        # the splits' content hashes. A re-prepare that yields identical splits therefore reruns no training.
        unpack(rar_warmup_input),
        manifest=f"{PROCESSED}/{{dataset}}/manifest.json",
        code=train_code,
    output:
        metrics=f"{RESULTS}/runs/{{dataset}}/{{method}}/seed{{seed}}/metrics.json",
    params:
        config=RESOLVED_CONFIG,
        data=lambda wildcards: data_dir(wildcards.dataset),
        out=lambda wildcards: run_dir(wildcards.dataset, wildcards.method, wildcards.seed),
        fingerprint=train_fingerprint,
        rar_warmup=rar_warmup_flag,
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
        " --restart-if-changed {params.rar_warmup} > {log:q} 2>&1"
