# TinyStories text -> tokenizer.json -> packed token files.


rule download_tinystories:
    input:
        local_inputs,
    output:
        train=f"{RAW}/train.txt",
        validation=f"{RAW}/validation.txt",
        test=f"{RAW}/test.txt",
        meta=f"{RAW}/meta.json",
    params:
        json=as_json(config["dataset"]),
        out_dir=lambda w, output: os.path.dirname(output.meta),
    conda:
        CONDA_ENV
    log:
        "logs/download_tinystories.log",
    benchmark:
        "benchmarks/download_tinystories.tsv"
    shell:
        "python workflow_scripts/download_tinystories.py --out-dir {params.out_dir} "
        "--params {params.json:q} > {log} 2>&1"


rule train_tokenizer:
    input:
        text=rules.download_tinystories.output.train,
    output:
        tokenizer=f"{TOK}/tokenizer.json",
        meta=f"{TOK}/tokenizer_meta.json",
    params:
        json=as_json(
            {k: config["tokenizer"][k] for k in ("vocab_size", "special_tokens", "min_frequency")}
        ),
        out_dir=lambda w, output: os.path.dirname(output.tokenizer),
    threads: 4
    conda:
        CONDA_ENV
    log:
        "logs/train_tokenizer.log",
    benchmark:
        "benchmarks/train_tokenizer.tsv"
    shell:
        "RAYON_NUM_THREADS={threads} python workflow_scripts/train_tokenizer.py --text {input.text} "
        "--out-dir {params.out_dir} --params {params.json:q} > {log} 2>&1"


rule pack_tokens:
    input:
        text=f"{RAW}/{{split}}.txt",
        tokenizer=rules.train_tokenizer.output.tokenizer,
    output:
        bin=f"{PROC}/{{split}}.bin",
        meta=f"{PROC}/{{split}}.meta.json",
    params:
        json=as_json(config["packing"]),
    threads: 4
    conda:
        CONDA_ENV
    log:
        "logs/pack_tokens/{split}.log",
    benchmark:
        "benchmarks/pack_tokens/{split}.tsv"
    shell:
        "RAYON_NUM_THREADS={threads} python workflow_scripts/pack_tokens.py --text {input.text} "
        "--tokenizer {input.tokenizer} --out {output.bin} --params {params.json:q} > {log} 2>&1"


rule verify:
    conda:
        CONDA_ENV
    log:
        "logs/verify.log",
    shell:
        "python workflow_scripts/verify_artifacts.py data artifacts 2>&1 | tee {log}"
