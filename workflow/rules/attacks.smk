# Robustness analysis (SPEC 7): k-PGD on every run's evaluated split (Tables 4, 5), text-form samples from the
# rar / carl_rar runs (Table 6), and the figures.
ANALYSIS = config["analysis"]


rule attack:
    input:
        metrics=f"{RESULTS}/runs/{{dataset}}/{{method}}/seed{{seed}}/metrics.json",
        manifest=f"{PROCESSED}/{{dataset}}/manifest.json",
        code=code_inputs(ATTACK_CODE),
    output:
        summary=f"{RESULTS}/attacks/{{dataset}}/{{method}}/seed{{seed}}/summary.json",
    params:
        run=lambda wildcards: run_dir(wildcards.dataset, wildcards.method, wildcards.seed),
        data=lambda wildcards: data_dir(wildcards.dataset),
        out=lambda wildcards, output: str(Path(output.summary).parent),
        epsilons=" ".join(str(e) for e in ANALYSIS["epsilons"]),
        settings=f"--steps {ANALYSIS['steps']} --step-size-ratio {ANALYSIS['step_size_ratio']}"
        f" --batch-size {ANALYSIS['batch_size']} --seed {ANALYSIS['seed']}",
    log:
        f"{LOGS}/attack/{{dataset}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/attack/{{dataset}}/{{method}}/seed{{seed}}.tsv"
    threads: 4
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} carlrar attack --run {params.run:q} --data {params.data:q} --out {params.out:q}"
        " --epsilons {params.epsilons} {params.settings} > {log:q} 2>&1"


rule samples:
    input:
        metrics=f"{RESULTS}/runs/{{dataset}}/{{method}}/seed{{seed}}/metrics.json",
        base=f"{RESULTS}/runs/{{dataset}}/base/seed{{seed}}/metrics.json",
        manifest=f"{PROCESSED}/{{dataset}}/manifest.json",
        code=code_inputs(ATTACK_CODE),
    output:
        report=f"{RESULTS}/samples/{{dataset}}/{{method}}/seed{{seed}}.json",
    params:
        run=lambda wildcards: run_dir(wildcards.dataset, wildcards.method, wildcards.seed),
        base=lambda wildcards: run_dir(wildcards.dataset, "base", wildcards.seed),
        data=lambda wildcards: data_dir(wildcards.dataset),
        settings=f"--epsilon {ANALYSIS['samples_epsilon']} --steps {ANALYSIS['steps']}"
        f" --step-size-ratio {ANALYSIS['step_size_ratio']} --batch-size {ANALYSIS['batch_size']} --seed {ANALYSIS['seed']}",
    log:
        f"{LOGS}/samples/{{dataset}}/{{method}}/seed{{seed}}.log",
    threads: 4
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} carlrar samples --run {params.run:q} --base-run {params.base:q}"
        " --data {params.data:q} --out {output.report:q} {params.settings} > {log:q} 2>&1"


rule robustness_tables:
    input:
        summaries=attack_summaries(),
        samples=sample_reports(),
        code=code_inputs(TABLE_CODE),
    output:
        [report(f"{TABLES}/{name}.{ext}", caption="../report/robustness.rst", category="Tables",
                labels={"table": name, "format": ext}) if ext == "md" else f"{TABLES}/{name}.{ext}"
         for name in ROBUSTNESS_TABLES for ext in ("md", "csv", "tex")],
    params:
        out=TABLES,
        samples=lambda wildcards, input: ("--samples " + " ".join(input.samples)) if input.samples else "",
    log:
        f"{LOGS}/tables/robustness.log",
    localrule: True
    shell:
        "carlrar robustness-tables --summaries {input.summaries:q} {params.samples} --out-dir {params.out:q}"
        " > {log:q} 2>&1"


rule figures:
    input:
        metrics=metrics_files(),
        summaries=attack_summaries(),
        paired=f"{TABLES}/table_paired.csv",  # the differences from FreeLB, bootstrapped once (rule paired_table)
        code=code_inputs(TABLE_CODE),
    output:
        [report(f"{FIGURES}/{name}.{ext}", caption="../report/figures.rst", category="Figures",
                labels={"figure": name}) if ext == "png" else f"{FIGURES}/{name}.{ext}"
         for name in FIGURE_NAMES for ext in ("pdf", "png")],
    params:
        out=FIGURES,
    log:
        f"{LOGS}/figures/figures.log",
    localrule: True
    shell:
        "MPLBACKEND=Agg carlrar figures --metrics {input.metrics:q} --summaries {input.summaries:q}"
        " --paired {input.paired:q} --out-dir {params.out:q} > {log:q} 2>&1"
