# The carlrar workflow: raw data -> prepared splits -> one training run per (dataset, method, seed) -> Table 2.
# Run from the repository root, e.g.
#   snakemake --cores 8 --resources gpu=2 --config raw_dir=../shared/data
#   snakemake --cores 4 --configfile config/smoke.yaml --replace-workflow-config --config raw_dir=../shared/data
#   snakemake hpsearch --cores 8 --resources gpu=2   # FreeLB's grid search, on request (rules/hpsearch.smk)
# Targets go first: --resources, --config and --configfile take several values and would swallow a target after
# them. tests/test_printed_commands.py dry-runs every command printed here and in the README.
# A --configfile is merged into config/config.yaml (a partial file changes only its keys); with
# --replace-workflow-config it replaces it (a whole other config: smoke, quick, minilm).
configfile: "config/config.yaml"
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/attacks.smk"
include: "workflow/rules/hpsearch.smk"


rule all:
    input:
        table_files(),
    default_target: True
