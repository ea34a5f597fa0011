# TinyStories text -> tokenizer.json -> packed token files.


rule download_tinystories:
    input:
        local_inputs,
    output:
        train=f"{RAW}/train.txt",
        validation=f"{RAW}/validation.txt",
        test=f"{RAW}/test.txt",
        meta=f"{RAW}/meta.json",
    log:
        f"logs/download_tinystories/{config['dataset']['name']}.log",
    benchmark:
        f"benchmarks/download_tinystories/{config['dataset']['name']}.tsv"
    conda:
        CONDA_ENV
    threads: 8  # worker processes writing synthetic stories (capped at the cores there are)
    params:
        json=as_json(DATA_PARAMS["download_tinystories"]),
        out_dir=lambda w, output: os.path.dirname(output.meta),
    shell:
        "RAYON_NUM_THREADS={threads} python workflow_scripts/download_tinystories.py --out-dir {params.out_dir} "
        "--params {params.json:q}"
        f"{TO_LOG_AND_TERMINAL}"


rule train_tokenizer:
    input:
        text=rules.download_tinystories.output.train,
    output:
        tokenizer=f"{TOK}/tokenizer.json",
        meta=f"{TOK}/tokenizer_meta.json",
    log:
        f"logs/train_tokenizer/{DATA_KEY}.log",
    benchmark:
        f"benchmarks/train_tokenizer/{DATA_KEY}.tsv"
    conda:
        CONDA_ENV
    threads: 8  # the tokenizer's threads (capped at the cores there are)
    params:
        json=as_json(DATA_PARAMS["train_tokenizer"]),
        out_dir=lambda w, output: os.path.dirname(output.tokenizer),
    shell:
        "RAYON_NUM_THREADS={threads} python workflow_scripts/train_tokenizer.py --text {input.text} "
        "--out-dir {params.out_dir} --params {params.json:q}"
        f"{TO_LOG_AND_TERMINAL}"


rule pack_tokens:
    input:
        text=f"{RAW}/{{split}}.txt",
        tokenizer=rules.train_tokenizer.output.tokenizer,
    output:
        bin=f"{PROC}/{{split}}.bin",
        meta=f"{PROC}/{{split}}.meta.json",
    log:
        f"logs/pack_tokens/{DATA_KEY}/{{split}}.log",
    benchmark:
        f"benchmarks/pack_tokens/{DATA_KEY}/{{split}}.tsv"
    priority: PACK_PRIORITY
    conda:
        CONDA_ENV
    threads: 8  # worker processes (capped at the cores there are)
    params:
        json=as_json(DATA_PARAMS["pack_tokens"]),
    shell:
        "RAYON_NUM_THREADS={threads} python workflow_scripts/pack_tokens.py --text {input.text} "
        "--tokenizer {input.tokenizer} --out {output.bin} --params {params.json:q}"
        f"{TO_LOG_AND_TERMINAL}"


rule verify:
    log:
        f"{LOGS}/verify.log",
    conda:
        CONDA_ENV
    params:
        roots=["data", "artifacts/tokenizers", RUNS],
        # this config's tokenizer and splits must be made from its own dataset's text
        raw_dir=RAW,
        # every output the config implies: a missing one (a deleted meta file too) is an error
        expected=lambda w: [
            *rules.download_tinystories.output,
            *rules.train_tokenizer.output,
            *expand(rules.pack_tokens.output, split=SPLITS),
            *expand(rules.train_model.output, run=list(RUN_TABLE)),
            *expand(rules.evaluate_model.output, run=list(RUN_TABLE)),
        ],
        # named when none of those exist yet: one line saying what to run, not one per file
        build_command=build_command(
            workflow.config_settings.configfiles,
            workflow.config_settings.config_args or [],
        ),
    shell:
        "python workflow_scripts/verify_artifacts.py {params.roots} "
        "--expected {params.expected:q} --raw-dir {params.raw_dir} "
        "--build-command {params.build_command:q} 2>&1 | tee {log}"
