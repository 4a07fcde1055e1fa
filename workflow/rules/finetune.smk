rule run_config:
    output:
        f"{RESULTS}/{{stage}}/{{run}}/config.json",
    params:
        record=run_record,
    log:
        f"{RESULTS}/{{stage}}/{{run}}/run_config.log",
    localrule: True
    conda:
        "../envs/ssl3d.yaml"
    # the run's identity and the files it reads: what `ssl3d pretrain|finetune|evaluate` are given
    shell:
        WRITE_RECORD


# Training, then evaluation on the test cases in the same process (one start-up per run); `ssl3d evaluate`
# re-scores a model by hand.
rule finetune:
    input:
        unpack(run_inputs),
        config=f"{RESULTS}/{{stage}}/{{run}}/config.json",
    output:
        model=f"{RESULTS}/{{stage}}/{{run}}/model.pt",
        train_log=f"{RESULTS}/{{stage}}/{{run}}/train_log.csv",
        manifest=f"{RESULTS}/{{stage}}/{{run}}/manifest.json",
        per_case=f"{RESULTS}/{{stage}}/{{run}}/per_case.csv",
    params:
        out=output_dir,
        inputs=local_inputs,
        device=device,
        workers=loader_workers,
        tolerance=json.dumps(config["evaluation"]["nsd_tolerance_mm"], sort_keys=True),
        policy=json.dumps(config["evaluation"]["empty"], sort_keys=True),
    log:
        f"{RESULTS}/{{stage}}/{{run}}/finetune.log",
    benchmark:
        f"{RESULTS}/{{stage}}/{{run}}/finetune.benchmark.tsv"
    wildcard_constraints:
        stage="finetune",
    resources:
        gpu=0,
        **estimated_resources("finetune"),
    conda:
        "../envs/ssl3d.yaml"
    shell:
        "python -m ssl3d --threads {threads} finetune --run-config {input.config} --out {params.out}"
        " --inputs {params.inputs:q} --device {params.device} --workers {params.workers} --evaluate {output.per_case}"
        " --nsd-tolerance {params.tolerance:q} --empty-policy {params.policy:q} > {log} 2>&1"
