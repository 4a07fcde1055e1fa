rule pretrain:
    input:
        unpack(run_inputs),
        config=f"{RESULTS}/{{stage}}/{{run}}/config.json",
    output:
        checkpoint=f"{RESULTS}/{{stage}}/{{run}}/pretrained.pt",
        step_log=f"{RESULTS}/{{stage}}/{{run}}/step_log.csv",
        manifest=f"{RESULTS}/{{stage}}/{{run}}/manifest.json",
    params:
        out=output_dir,
        inputs=local_inputs,
        device=device,
        workers=loader_workers,
        python=launcher,
        threads=threads_per_process,
    log:
        f"{RESULTS}/{{stage}}/{{run}}/pretrain.log",
    benchmark:
        f"{RESULTS}/{{stage}}/{{run}}/pretrain.benchmark.tsv"
    wildcard_constraints:
        stage="pretrain",
    resources:
        gpu=0,
        **estimated_resources("pretrain"),
    conda:
        "../envs/ssl3d.yaml"
    shell:
        "{params.python} -m ssl3d --threads {params.threads} pretrain --run-config {input.config} --out {params.out}"
        " --inputs {params.inputs:q} --device {params.device} --workers {params.workers} > {log} 2>&1"
