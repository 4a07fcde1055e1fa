rule run_config:
    output:
        f"{RESULTS}/{{stage}}/{{run}}/config.json",
    params:
        record=run_record,
    log:
        f"{RESULTS}/{{stage}}/{{run}}/run_config.log",
    localrule: True
    run:
        # the run's identity and the files it reads: what `ssl3d pretrain|finetune|evaluate` are given
        write_record(output[0], log[0], json.loads(params.record), f"wrote {output[0]}")


rule finetune:
    input:
        unpack(run_inputs),
        config=f"{RESULTS}/{{stage}}/{{run}}/config.json",
    output:
        model=f"{RESULTS}/{{stage}}/{{run}}/model.pt",
        train_log=f"{RESULTS}/{{stage}}/{{run}}/train_log.csv",
        manifest=f"{RESULTS}/{{stage}}/{{run}}/manifest.json",
    params:
        out=output_dir,
        device=device,
        workers=loader_workers,
    log:
        f"{RESULTS}/{{stage}}/{{run}}/finetune.log",
    benchmark:
        f"{RESULTS}/{{stage}}/{{run}}/finetune.benchmark.tsv"
    wildcard_constraints:
        stage="finetune",
    resources:
        gpu=0,
    conda:
        "../envs/ssl3d.yaml"
    shell:
        "python -m ssl3d --threads {threads} finetune --run-config {input.config} --out {params.out}"
        " --device {params.device} --workers {params.workers} > {log} 2>&1"


rule evaluate:
    input:
        config=f"{RESULTS}/{{stage}}/{{run}}/config.json",
        model=f"{RESULTS}/{{stage}}/{{run}}/model.pt",
    output:
        f"{RESULTS}/{{stage}}/{{run}}/per_case.csv",
    params:
        tolerance=json.dumps(config["evaluation"]["nsd_tolerance_mm"], sort_keys=True),
        policy=json.dumps(config["evaluation"]["empty"], sort_keys=True),
        device=device,
    log:
        f"{RESULTS}/{{stage}}/{{run}}/evaluate.log",
    wildcard_constraints:
        stage="finetune",
    resources:
        gpu=0,
    conda:
        "../envs/ssl3d.yaml"
    shell:
        "python -m ssl3d --threads {threads} evaluate --run-config {input.config} --model {input.model} --out {output}"
        " --nsd-tolerance {params.tolerance:q} --empty-policy {params.policy:q} --device {params.device}"
        " > {log} 2>&1"
