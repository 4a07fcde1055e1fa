rule collect:
    input:
        expand(f"{RESULTS}/finetune/{{run}}/per_case.csv", run=RUNS),
    output:
        f"{RESULTS}/per_case.csv",
    log:
        f"{RESULTS}/logs/collect.log",
    localrule: True
    conda:
        "../envs/ssl3d.yaml"
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
    localrule: True
    conda:
        "../envs/ssl3d.yaml"
    shell:
        "python -m ssl3d summarise --per-case {input} --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"


rule skipped:
    output:
        f"{RESULTS}/skipped.json",
    params:
        record=json.dumps(SKIPPED, sort_keys=True),
    log:
        f"{RESULTS}/logs/skipped.log",
    localrule: True
    conda:
        "../envs/ssl3d.yaml"
    shell:
        WRITE_RECORD


rule report:
    input:
        unpack(report_inputs),
    output:
        report(
            directory(f"reports/{config['experiment']}"),
            htmlindex="index.html",
            caption="../report/report.rst",
            category="Report",
        ),
    params:
        results=input_dir,  # results/<experiment>, the folder of per_case.csv
        options=json.dumps(config.get("report", {}), sort_keys=True),
        caches=local_caches,
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "../envs/ssl3d.yaml"
    shell:
        "python -m ssl3d report --results {params.results} --out {output} --options {params.options:q}"
        " --caches {params.caches:q} --comparisons {input.comparisons:q} > {log} 2>&1"
