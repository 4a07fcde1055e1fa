# The whole suite as one DAG. Rules live in workflow/rules/; the default target lives here because Snakemake
# only takes a default target from the main Snakefile.
include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/results.smk"


rule all:
    default_target: True
    input:
        f"{RESULTS}/summary.md",
        f"{RESULTS}/skipped.json",
        f"reports/{config['experiment']}",
