# Evaluation of each run's best checkpoint, and the summary across runs (report outputs).


rule evaluate_model:
    input:
        best=rules.train_model.output.best,
        tokenizer=rules.train_tokenizer.output.tokenizer,
        validation=f"{PROC}/validation.bin",
        validation_meta=f"{PROC}/validation.meta.json",
        test=f"{PROC}/test.bin",
        test_meta=f"{PROC}/test.meta.json",
    output:
        metrics=f"{RUNS}/{{run}}/metrics.json",
    log:
        f"{LOGS}/evaluate_model/{{run}}.log",
    benchmark:
        f"{BENCHMARKS}/evaluate_model/{{run}}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        gpu=1,
    params:
        json=lambda w: as_json(
            {
                **config["eval"],
                "device": RUN_TABLE[w.run]["train_config"]["device"],
                "precision": RUN_TABLE[w.run]["train_config"]["precision"],
            }
        ),
    shell:
        "python workflow_scripts/evaluate_model.py --name {wildcards.run} --checkpoint {input.best} "
        "--tokenizer {input.tokenizer} --val-bin {input.validation} --test-bin {input.test} "
        "--out {output.metrics} --threads {threads} --params {params.json:q}"
        f"{TO_LOG_AND_TERMINAL}"


rule summarize:
    input:
        metrics=expand(rules.evaluate_model.output.metrics, run=list(RUN_TABLE)),
        history=expand(rules.train_model.output.history, run=list(RUN_TABLE)),
    output:
        csv=report(
            f"{RESULTS}/summary.csv",
            caption="../report/summary.rst",
            category="1. Summary",
            labels={"table": "summary.csv (download, full precision)"},
        ),
        table=report(
            f"{PLOTS}/summary.html",
            caption="../report/summary.rst",
            category="1. Summary",
            labels={"table": "summary table"},
        ),
        loss_vs_step=report(
            f"{PLOTS}/loss_vs_step.png",
            caption="../report/loss_vs_step.rst",
            category="2. Training curves",
            labels={"figure": "loss against step"},
        ),
        loss_vs_time=report(
            f"{PLOTS}/loss_vs_time.png",
            caption="../report/loss_vs_time.rst",
            category="2. Training curves",
            labels={"figure": "loss against wall-clock time"},
        ),
        samples=report(
            f"{PLOTS}/samples.html",
            caption="../report/samples.rst",
            category="3. Samples",
            labels={"page": "generated samples"},
        ),
        expert_load=[
            report(
                f"{PLOTS}/{m}_expert_load.png",
                caption="../report/expert_load.rst",
                category="4. Mixture of experts",
                subcategory=m,
                labels={"figure": "expert load per layer"},
            )
            for m in MOE_RUNS
        ],
        dropped=[
            report(
                f"{PLOTS}/{m}_dropped.png",
                caption="../report/dropped.rst",
                category="4. Mixture of experts",
                subcategory=m,
                labels={"figure": "dropped tokens and router losses"},
            )
            for m in MOE_RUNS
        ],
    log:
        f"{LOGS}/summarize.log",
    conda:
        CONDA_ENV
    params:
        runs=summary_inputs,
        moe_plots=moe_plot_outputs,
    shell:
        "python workflow_scripts/summarize.py --runs {params.runs:q} --csv {output.csv} "
        "--table {output.table} --samples {output.samples} --loss-vs-step {output.loss_vs_step} "
        "--loss-vs-time {output.loss_vs_time} --moe-plots {params.moe_plots:q}"
        f"{TO_LOG_AND_TERMINAL}"
