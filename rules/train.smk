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
    # longest first (TRAINING_ORDER in common.smk)
    priority: lambda w: TRAINING_ORDER[w.run]
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=lambda w: run_gpus(w.run),
    params:
        json=lambda w: as_json(
            {
                "model": RUN_TABLE[w.run]["model_config"],
                "train": split_record_only(RUN_TABLE[w.run]["train_config"])[0],
                "eval_batch_size": config["eval"]["batch_size"],
            }
        ),
        # log_every, save_every, max_gpus, wandb: what the run records, not what it computes. Snakemake
        # reruns a job whose params changed, except params computed from its input, output, threads or
        # resources; this function takes `threads` for that alone (tests/test_workflow.py checks it).
        record_only=lambda w, threads: as_json(
            split_record_only(RUN_TABLE[w.run]["train_config"])[1]
        ),
        launcher=train_launcher,
        run_dir=lambda w, output: os.path.dirname(output.config),
    shell:
        "{params.launcher} workflow_scripts/train_model.py --name {wildcards.run} "
        "--train-bin {input.train} --val-bin {input.validation} --tokenizer {input.tokenizer} "
        "--best {output.best} --history {output.history} --config {output.config} --run-dir {params.run_dir} "
        "--threads {threads} --params {params.json:q} --record-only {params.record_only:q}"
        f"{TO_LOG_AND_TERMINAL}"
