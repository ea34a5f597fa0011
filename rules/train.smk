# One training rule for every run: {run} is any name in RUN_TABLE (a model at a seed, or a sweep's run).


rule train_model:
    input:
        train=f"{PROC}/train.bin",
        train_meta=f"{PROC}/train.meta.json",
        validation=f"{PROC}/validation.bin",
        validation_meta=f"{PROC}/validation.meta.json",
        tokenizer=rules.train_tokenizer.output.tokenizer,
    output:
        best=f"{RUNS}/{{run}}/checkpoints/best_model.pt",
        history=f"{RUNS}/{{run}}/metrics.jsonl",
        config=f"{RUNS}/{{run}}/config.json",
    log:
        f"{LOGS}/train_model/{{run}}.log",
    benchmark:
        f"{BENCHMARKS}/train_model/{{run}}.tsv"
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=lambda w: RUN_TABLE[w.run]["train_config"]["gpus"],
    params:
        json=lambda w: as_json(
            {
                "model": RUN_TABLE[w.run]["model_config"],
                "train": RUN_TABLE[w.run]["train_config"],
                "eval_batch_size": config["eval"]["batch_size"],
            }
        ),
        launcher=train_launcher,
        run_dir=lambda w, output: os.path.dirname(output.config),
    shell:
        "{params.launcher} workflow_scripts/train_model.py --name {wildcards.run} "
        "--train-bin {input.train} --val-bin {input.validation} --tokenizer {input.tokenizer} "
        "--best {output.best} --history {output.history} --config {output.config} --run-dir {params.run_dir} "
        "--threads {threads} --params {params.json:q}"
        f"{TO_LOG_AND_TERMINAL}"
