rule fetch:
    output:
        "data/sources/{dataset}/verified.json",
    params:
        settings=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset]),
    log:
        "logs/fetch/{dataset}.log",
    conda:
        "../../environment.yml"
    shell:
        "python -m ssl3d fetch --dataset {wildcards.dataset} --settings {params.settings:q} > {log} 2>&1"


rule fetch_weights:
    output:
        "data/weights/{checkpoint}/verified.json",
    log:
        "logs/fetch_weights/{checkpoint}.log",
    conda:
        "../../environment.yml"
    shell:
        "python -m ssl3d fetch-weights --name {wildcards.checkpoint} > {log} 2>&1"


rule prepare:
    input:
        verified_source,
    output:
        "data/raw/{dataset}/dataset.json",
    params:
        settings=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset]),
    log:
        "logs/prepare/{dataset}.log",
    conda:
        "../../environment.yml"
    shell:
        "python -m ssl3d prepare --dataset {wildcards.dataset} --settings {params.settings:q} > {log} 2>&1"


rule preprocess:
    input:
        "data/raw/{dataset}/dataset.json",
    output:
        "data/preprocessed/{recipe}/{dataset}/index.json",
    log:
        "logs/preprocess/{recipe}/{dataset}.log",
    params:
        dataset=input_dir,
        out=output_dir,
    conda:
        "../../environment.yml"
    shell:
        "python -m ssl3d --threads {threads} preprocess --dataset {params.dataset} --recipe {wildcards.recipe}"
        " --out {params.out} > {log} 2>&1"


rule splits:
    input:
        lambda wildcards: f"data/preprocessed/{dataset_recipe(config, wildcards.dataset)}/{wildcards.dataset}/index.json",
    output:
        f"{RESULTS}/splits/{{dataset}}.json",
    params:
        s=config["splits"],
        paper=lambda wildcards: (f"--paper-split {config['datasets'][wildcards.dataset]['split']}"
                                 if "split" in config["datasets"][wildcards.dataset] else ""),
    log:
        f"{RESULTS}/logs/splits/{{dataset}}.log",
    conda:
        "../../environment.yml"
    shell:
        "python -m ssl3d splits --index {input} --out {output} --seed {params.s[seed]} --validation {params.s[validation]}"
        " --test {params.s[test]} --fractions {params.s[label_fractions]} --subsets {params.s[subsets]} {params.paper}"
        " > {log} 2>&1"
