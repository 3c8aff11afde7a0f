# Tables from the finished runs. Table 2: clean accuracy, mean ± std over seeds, delta vs FreeLB; Table 7: parameters.


rule table2:
    input:
        metrics=after_prepare(metrics_files()),
    output:
        md=report(f"{TABLE2_PREFIX}.md", caption="../report/table2.rst", category="Tables",
                  labels={"table": "2 (accuracy)", "format": "md"}),
        csv=report(f"{TABLE2_PREFIX}.csv", caption="../report/table2.rst", category="Tables",
                   labels={"table": "2 (accuracy)", "format": "csv"}),
        tex=f"{TABLE2_PREFIX}.tex",
    params:
        prefix=prefix_of("md"),
        code=job_param("table2", "code"),
    log:
        f"{LOGS}/table2/table2_accuracy.log",
    conda:
        "../envs/carlrar.yaml"
    localrule: True
    shell:
        "carlrar table2 --metrics {input.metrics:q} --out {params.prefix:q} > {log:q} 2>&1"


rule table7:
    input:
        metrics=after_prepare(metrics_files()),
    output:
        md=report(f"{TABLE7_PREFIX}.md", caption="../report/table7.rst", category="Tables",
                  labels={"table": "7 (parameters)", "format": "md"}),
        csv=report(f"{TABLE7_PREFIX}.csv", caption="../report/table7.rst", category="Tables",
                   labels={"table": "7 (parameters)", "format": "csv"}),
    params:
        prefix=prefix_of("md"),
        code=job_param("table7", "code"),
    log:
        f"{LOGS}/table7/table7_params.log",
    conda:
        "../envs/carlrar.yaml"
    localrule: True
    shell:
        "carlrar table7 --metrics {input.metrics:q} --out {params.prefix:q} > {log:q} 2>&1"


# Paired comparison on the same examples: each method minus FreeLB and minus base, clean (eval_predictions.parquet
# beside each metrics.json) and under attack (records_eps*.parquet beside each summary.json), paired bootstrap CIs.
rule paired_table:
    input:
        metrics=after_prepare(metrics_files()),
        summaries=after_prepare(attack_summaries()),
    output:
        [report(f"{TABLES}/table_paired.{ext}", caption="../report/paired.rst", category="Tables",
                labels={"table": "paired differences", "format": ext}) if ext in ("md", "csv")
         else f"{TABLES}/table_paired.{ext}" for ext in ("md", "csv", "tex")],
    params:
        prefix=lambda wildcards, output: str(Path(output[0]).with_suffix("")),
        code=job_param("paired_table", "code"),
    log:
        f"{LOGS}/tables/paired.log",
    conda:
        "../envs/carlrar.yaml"
    localrule: True
    shell:
        "carlrar paired-table --metrics {input.metrics:q} --summaries {input.summaries:q} --out {params.prefix:q}"
        " > {log:q} 2>&1"
