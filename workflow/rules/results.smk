rule collect:
    input:
        expand(f"{RESULTS}/finetune/{{run}}/per_case.csv", run=RUNS),
    output:
        f"{RESULTS}/per_case.csv",
    log:
        f"{RESULTS}/logs/collect.log",
    conda:
        "../../environment.yml"
    shell:
        "python -m ssl3d collect --out {output} {input} > {log} 2>&1"


rule summarise:
    input:
        f"{RESULTS}/per_case.csv",
    output:
        csv=f"{RESULTS}/summary.csv",
        md=f"{RESULTS}/summary.md",
    log:
        f"{RESULTS}/logs/summarise.log",
    conda:
        "../../environment.yml"
    shell:
        "python -m ssl3d summarise --per-case {input} --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"


rule skipped:
    output:
        f"{RESULTS}/skipped.json",
    params:
        skipped=SKIPPED,
    log:
        f"{RESULTS}/logs/skipped.log",
    localrule: True
    run:
        write_record(output[0], log[0], params.skipped, f"{len(params.skipped)} dataset(s) skipped")
