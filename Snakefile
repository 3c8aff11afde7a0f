# The carlrar workflow: raw data -> prepared splits -> one training run per (dataset, method, seed) -> Table 2.
# Run from the repository root, e.g.
#   snakemake --cores 8 --resources gpu=2 --config raw_dir=../shared/data
#   snakemake --cores 4 --configfile config/smoke.yaml --config raw_dir=../shared/data
#   snakemake --cores 8 --resources gpu=2 hpsearch   # FreeLB's grid search, on request (rules/hpsearch.smk)
# A --configfile given on the command line replaces config/config.yaml (see workflow/rules/common.smk).
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
