# One training rule for every model: {model} is any name under `models:` in the config.


rule train_model:
    input:
        train=f"{PROC}/train.bin",
        train_meta=f"{PROC}/train.meta.json",
        validation=f"{PROC}/validation.bin",
        validation_meta=f"{PROC}/validation.meta.json",
        tokenizer=rules.train_tokenizer.output.tokenizer,
    output:
        best=f"{RUNS}/{{model}}/checkpoints/best_model.pt",
        history=f"{RUNS}/{{model}}/metrics.jsonl",
        config=f"{RUNS}/{{model}}/config.json",
    log:
        "logs/train_model/{model}.log",
    benchmark:
        "benchmarks/train_model/{model}.tsv"
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=lambda w: train_params(config, w.model)["gpus"],
    params:
        json=lambda w: as_json(
            {
                "model": model_params(config, w.model),
                "train": train_params(config, w.model),
                "eval_batch_size": config["eval"]["batch_size"],
            }
        ),
        launcher=train_launcher,
        run_dir=lambda w, output: os.path.dirname(output.config),
    shell:
        "{params.launcher} workflow_scripts/train_model.py --name {wildcards.model} "
        "--train-bin {input.train} --val-bin {input.validation} --tokenizer {input.tokenizer} "
        "--best {output.best} --history {output.history} --config {output.config} --run-dir {params.run_dir} "
        "--threads {threads} --params {params.json:q}"
        f"{TO_LOG_AND_TERMINAL}"
