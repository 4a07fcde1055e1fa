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
        device=device,
    log:
        f"{RESULTS}/{{stage}}/{{run}}/pretrain.log",
    benchmark:
        f"{RESULTS}/{{stage}}/{{run}}/pretrain.benchmark.tsv"
    wildcard_constraints:
        stage="pretrain",
    resources:
        gpu=0,
    conda:
        "../../environment.yml"
    shell:
        "python -m ssl3d --threads {threads} pretrain --run-config {input.config} --out {params.out}"
        " --device {params.device} > {log} 2>&1"
