# Evaluation of each model's best checkpoint, and the summary across models (report outputs).


rule evaluate_model:
    input:
        best=rules.train_model.output.best,
        tokenizer=rules.train_tokenizer.output.tokenizer,
        validation=f"{PROC}/validation.bin",
        validation_meta=f"{PROC}/validation.meta.json",
        test=f"{PROC}/test.bin",
        test_meta=f"{PROC}/test.meta.json",
    output:
        metrics=f"{RUNS}/{{model}}/metrics.json",
    params:
        json=lambda w: as_json(
            {**config["eval"], "device": train_params(config, w.model)["device"],
             "precision": train_params(config, w.model)["precision"]}
        ),
    threads: 2
    resources:
        gpu=1,
    log:
        "logs/evaluate_model/{model}.log",
    benchmark:
        "benchmarks/evaluate_model/{model}.tsv"
    shell:
        "{PYTHON} workflow_scripts/evaluate_model.py --name {wildcards.model} --checkpoint {input.best} "
        "--tokenizer {input.tokenizer} --val-bin {input.validation} --test-bin {input.test} "
        "--out {output.metrics} --threads {threads} --params {params.json:q} > {log} 2>&1"


rule summarize:
    input:
        metrics=expand(rules.evaluate_model.output.metrics, model=MODELS),
        history=expand(rules.train_model.output.history, model=MODELS),
    output:
        csv="artifacts/summary.csv",
    params:
        runs=as_json({m: f"{RUNS}/{m}" for m in MODELS}),
    log:
        "logs/summarize.log",
    shell:
        "{PYTHON} workflow_scripts/summarize.py --runs {params.runs:q} --csv {output.csv} "
        "--plots artifacts/plots > {log} 2>&1"
