rule fetch:
    output:
        f"{DATA}/sources/{{dataset}}/verified.json",
    params:
        settings=lambda wildcards: stage_settings(config, wildcards.dataset, "fetch"),
        data=data_root_of,
    log:
        "logs/fetch/{dataset}.log",
    conda:
        "../envs/ssl3d.yaml"
    shell:
        "python -m ssl3d fetch --dataset {wildcards.dataset} --settings {params.settings:q} --data-root {params.data:q}"
        " > {log} 2>&1"


rule fetch_weights:
    output:
        f"{DATA}/weights/{{checkpoint}}/verified.json",
    params:
        data=data_root_of,
    log:
        "logs/fetch_weights/{checkpoint}.log",
    conda:
        "../envs/ssl3d.yaml"
    shell:
        "python -m ssl3d fetch-weights --name {wildcards.checkpoint} --data-root {params.data:q} > {log} 2>&1"


rule prepare:
    input:
        prepare_inputs,
    output:
        f"{DATA}/raw/{{dataset}}/dataset.json",
    params:
        settings=lambda wildcards: stage_settings(config, wildcards.dataset, "prepare"),
        data=data_root_of,
    log:
        "logs/prepare/{dataset}.log",
    conda:
        "../envs/ssl3d.yaml"
    shell:
        "python -m ssl3d prepare --dataset {wildcards.dataset} --settings {params.settings:q} --data-root {params.data:q}"
        " > {log} 2>&1"


rule preprocess:
    input:
        f"{DATA}/raw/{{dataset}}/dataset.json",
    output:
        f"{DATA}/preprocessed/{{recipe}}/{{dataset}}/index.json",
    log:
        "logs/preprocess/{recipe}/{dataset}.log",
    params:
        dataset=input_dir,
        out=output_dir,
        options=preprocess_options,
    conda:
        "../envs/ssl3d.yaml"
    shell:
        "python -m ssl3d --threads {threads} preprocess --dataset {params.dataset} --recipe {wildcards.recipe}"
        " --out {params.out} {params.options} > {log} 2>&1"


rule splits:
    input:
        lambda wildcards: f"{DATA}/preprocessed/{dataset_recipe(config, wildcards.dataset)}/{wildcards.dataset}/index.json",
    output:
        f"{RESULTS}/splits/{{dataset}}.json",
    params:
        seed=config["splits"]["seed"],
        validation=config["splits"]["validation"],
        test=config["splits"]["test"],
        fractions=config["splits"]["label_fractions"],
        subsets=config["splits"]["subsets"],
        paper=lambda wildcards: (f"--paper-split {config['datasets'][wildcards.dataset]['split']}"
                                 if "split" in config["datasets"][wildcards.dataset] else ""),
    log:
        f"{RESULTS}/logs/splits/{{dataset}}.log",
    conda:
        "../envs/ssl3d.yaml"
    shell:
        "python -m ssl3d splits --index {input} --out {output} --seed {params.seed} --validation {params.validation}"
        " --test {params.test} --fractions {params.fractions} --subsets {params.subsets} {params.paper}"
        " > {log} 2>&1"
