rule prepare_phantoms:
    output:
        "data/raw/{dataset}/dataset.json",
    params:
        gen=dataset_settings,
        out=output_dir,
    log:
        "logs/prepare/{dataset}.log",
    conda:
        "../../environment.yml"
    shell:
        "python -m ssl3d phantoms --out {params.out} --labelled {params.gen[labelled]}"
        " --unlabelled {params.gen[unlabelled]} --seed {params.gen[seed]} --shape {params.gen[shape]}"
        " --spacing {params.gen[spacing]} > {log} 2>&1"


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
    log:
        f"{RESULTS}/logs/splits/{{dataset}}.log",
    conda:
        "../../environment.yml"
    shell:
        "python -m ssl3d splits --index {input} --out {output} --seed {params.s[seed]} --validation {params.s[validation]}"
        " --test {params.s[test]} --fractions {params.s[label_fractions]} --subsets {params.s[subsets]} > {log} 2>&1"
