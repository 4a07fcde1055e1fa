rule fetch:
    output:
        directory(f"{DATA}/sources/{{dataset}}"),
    params:
        settings=lambda wildcards: stage_settings(config, wildcards.dataset, "fetch"),
        data=data_root_of(2),
    log:
        "logs/fetch/{dataset}.log",
    conda:
        "../envs/ssl3d.yaml"
    shell:
        "python -m ssl3d fetch --dataset {wildcards.dataset} --settings {params.settings:q} --data-root {params.data:q}"
        " > {log} 2>&1"


rule fetch_weights:
    input:
        released_copy,
    output:
        directory(f"{DATA}/weights/{{checkpoint}}/verified"),
    params:
        data=data_root_of(3),
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
        directory(f"{DATA}/raw/{{dataset}}"),
    params:
        settings=lambda wildcards: stage_settings(config, wildcards.dataset, "prepare"),
        files=folder_files,
        data=data_root_of(2),
    log:
        "logs/prepare/{dataset}.log",
    conda:
        "../envs/ssl3d.yaml"
    shell:
        "python -m ssl3d prepare --dataset {wildcards.dataset} --settings {params.settings:q} --data-root {params.data:q}"
        " > {log} 2>&1"


rule preprocess:
    input:
        raw=f"{DATA}/raw/{{dataset}}",
        sources=prepare_inputs,  # the converted folder links to its source files
    output:
        directory(f"{DATA}/preprocessed/{{recipe}}/{{dataset}}"),
    log:
        "logs/preprocess/{recipe}/{dataset}.log",
    params:
        options=preprocess_options,
    conda:
        "../envs/ssl3d.yaml"
    shell:
        "python -m ssl3d --threads {threads} preprocess --dataset {input.raw} --recipe {wildcards.recipe}"
        " --out {output} {params.options} > {log} 2>&1"


rule splits:
    input:
        lambda wildcards: f"{DATA}/preprocessed/{dataset_recipe(config, wildcards.dataset)}/{wildcards.dataset}",
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
