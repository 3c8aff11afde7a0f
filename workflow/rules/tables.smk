# Tables from the finished runs. Table 2: clean accuracy, mean ± std over seeds, delta vs FreeLB; Table 7: parameters.


rule table2:
    input:
        metrics=metrics_files(),
        code=code_inputs(TABLE_CODE),
    output:
        md=report(f"{TABLE2_PREFIX}.md", caption="../report/table2.rst", category="Tables",
                  labels={"table": "2 (accuracy)", "format": "md"}),
        csv=report(f"{TABLE2_PREFIX}.csv", caption="../report/table2.rst", category="Tables",
                   labels={"table": "2 (accuracy)", "format": "csv"}),
        tex=f"{TABLE2_PREFIX}.tex",
    params:
        prefix=lambda wildcards, output: output.md.removesuffix(".md"),
    log:
        f"{LOGS}/table2/table2_accuracy.log",
    localrule: True
    shell:
        "carlrar table2 --metrics {input.metrics:q} --out {params.prefix:q} > {log:q} 2>&1"


rule table7:
    input:
        metrics=metrics_files(),
        code=code_inputs(TABLE_CODE),
    output:
        md=report(f"{TABLE7_PREFIX}.md", caption="../report/table7.rst", category="Tables",
                  labels={"table": "7 (parameters)", "format": "md"}),
        csv=report(f"{TABLE7_PREFIX}.csv", caption="../report/table7.rst", category="Tables",
                   labels={"table": "7 (parameters)", "format": "csv"}),
    params:
        prefix=TABLE7_PREFIX,
    log:
        f"{LOGS}/table7/table7_params.log",
    localrule: True
    shell:
        "carlrar table7 --metrics {input.metrics:q} --out {params.prefix:q} > {log:q} 2>&1"
