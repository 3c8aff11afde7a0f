# Robustness analysis (SPEC 7): k-PGD on every run's evaluated split (Tables 4, 5), text-form samples from the
# rar / carl_rar runs (Table 6), and the figures. `carlrar attack` and `carlrar samples` read their settings from
# the analysis section of the resolved config; the fingerprint param reruns them when a setting they use changes.

rule attack:
    input:
        metrics=f"{RESULTS}/runs/{{dataset}}/{{method}}/seed{{seed}}/metrics.json",
        data=prepared_data,
    output:
        summary=f"{RESULTS}/attacks/{{dataset}}/{{method}}/seed{{seed}}/summary.json",
    params:
        run=lambda wildcards, input: str(Path(input.metrics).parent),
        data=data_dir,
        out=parent_of("summary"),
        config=RESOLVED_CONFIG,
        settings=job_param("attack", "settings"),
        code=job_param("attack", "code"),
    log:
        f"{LOGS}/attack/{{dataset}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/attack/{{dataset}}/{{method}}/seed{{seed}}.tsv"
    conda:
        "../envs/carlrar.yaml"
    threads: 4
    resources:
        gpu=1,
        gpu_slots=1,
        mem_mb=16000,
        runtime=120,
    shell:
        "OMP_NUM_THREADS={threads} CARLRAR_GPU_SLOTS={resources.gpu_slots} carlrar attack --config {params.config:q}"
        " --run {params.run:q} --data {params.data:q} --out {params.out:q} > {log:q} 2>&1"


rule samples:
    input:
        metrics=f"{RESULTS}/runs/{{dataset}}/{{method}}/seed{{seed}}/metrics.json",
        base=f"{RESULTS}/runs/{{dataset}}/base/seed{{seed}}/metrics.json",
        data=prepared_data,
    output:
        report=f"{RESULTS}/samples/{{dataset}}/{{method}}/seed{{seed}}.json",
    params:
        run=lambda wildcards, input: str(Path(input.metrics).parent),
        base=lambda wildcards, input: str(Path(input.base).parent),
        data=data_dir,
        config=RESOLVED_CONFIG,
        settings=job_param("samples", "settings"),
        code=job_param("samples", "code"),
    log:
        f"{LOGS}/samples/{{dataset}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/samples/{{dataset}}/{{method}}/seed{{seed}}.tsv"
    conda:
        "../envs/carlrar.yaml"
    threads: 4
    resources:
        gpu=1,
        gpu_slots=1,
        mem_mb=16000,
        runtime=60,
    shell:
        "OMP_NUM_THREADS={threads} CARLRAR_GPU_SLOTS={resources.gpu_slots} carlrar samples --config {params.config:q}"
        " --run {params.run:q} --base-run {params.base:q} --data {params.data:q} --out {output.report:q}"
        " > {log:q} 2>&1"


rule robustness_tables:
    input:
        summaries=after_prepare(attack_summaries()),
        samples=after_prepare(sample_reports()),
    output:
        [report(f"{TABLES}/{name}.{ext}", caption="../report/robustness.rst", category="Tables",
                labels={"table": name, "format": ext}) if ext == "md" else f"{TABLES}/{name}.{ext}"
         for name in ROBUSTNESS_TABLES for ext in ("md", "csv", "tex")],
    params:
        out=lambda wildcards, output: str(Path(output[0]).parent),
        samples=lambda wildcards, input: ("--samples " + " ".join(input.samples)) if input.samples else "",
        code=job_param("robustness_tables", "code"),
    log:
        f"{LOGS}/tables/robustness.log",
    conda:
        "../envs/carlrar.yaml"
    localrule: True
    shell:
        "carlrar robustness-tables --summaries {input.summaries:q} {params.samples} --out-dir {params.out:q}"
        " > {log:q} 2>&1"


rule figures:
    input:
        metrics=after_prepare(metrics_files()),
        summaries=after_prepare(attack_summaries()),
        paired=f"{TABLES}/table_paired.csv",  # the differences from FreeLB, bootstrapped once (rule paired_table)
    output:
        [report(f"{FIGURES}/{name}.{ext}", caption="../report/figures.rst", category="Figures",
                labels={"figure": name}) if ext == "png" else f"{FIGURES}/{name}.{ext}"
         for name in FIGURE_NAMES for ext in ("pdf", "png")],
    params:
        out=lambda wildcards, output: str(Path(output[0]).parent),
        code=job_param("figures", "code"),
    log:
        f"{LOGS}/figures/figures.log",
    conda:
        "../envs/carlrar.yaml"
    localrule: True
    shell:
        "MPLBACKEND=Agg carlrar figures --metrics {input.metrics:q} --summaries {input.summaries:q}"
        " --paired {input.paired:q} --out-dir {params.out:q} > {log:q} 2>&1"
