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
        "logs/download_tinystories.log",
    benchmark:
        "benchmarks/download_tinystories.tsv"
    conda:
        CONDA_ENV
    params:
        json=as_json(config["dataset"]),
        out_dir=lambda w, output: os.path.dirname(output.meta),
    shell:
        "python workflow_scripts/download_tinystories.py --out-dir {params.out_dir} "
        "--params {params.json:q}"
        f"{TO_LOG_AND_TERMINAL}"


rule train_tokenizer:
    input:
        text=rules.download_tinystories.output.train,
    output:
        tokenizer=f"{TOK}/tokenizer.json",
        meta=f"{TOK}/tokenizer_meta.json",
    log:
        "logs/train_tokenizer.log",
    benchmark:
        "benchmarks/train_tokenizer.tsv"
    conda:
        CONDA_ENV
    threads: 4
    params:
        json=as_json(
            {
                k: config["tokenizer"][k]
                for k in ("vocab_size", "special_tokens", "min_frequency")
            }
        ),
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
        "logs/pack_tokens/{split}.log",
    benchmark:
        "benchmarks/pack_tokens/{split}.tsv"
    conda:
        CONDA_ENV
    threads: 4
    params:
        json=as_json(config["packing"]),
    shell:
        "RAYON_NUM_THREADS={threads} python workflow_scripts/pack_tokens.py --text {input.text} "
        "--tokenizer {input.tokenizer} --out {output.bin} --params {params.json:q}"
        f"{TO_LOG_AND_TERMINAL}"


rule verify:
    log:
        "logs/verify.log",
    conda:
        CONDA_ENV
    params:
        # every output the config implies: a missing one (a deleted meta file too) is an error
        expected=lambda w: [
            *rules.download_tinystories.output,
            *rules.train_tokenizer.output,
            *expand(rules.pack_tokens.output, split=SPLITS),
            *expand(rules.train_model.output, model=MODELS),
            *expand(rules.evaluate_model.output, model=MODELS),
        ],
    shell:
        "python workflow_scripts/verify_artifacts.py data artifacts "
        "--expected {params.expected:q} 2>&1 | tee {log}"
