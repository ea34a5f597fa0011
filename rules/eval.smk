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
    # its run's: ahead of the trainings of cheaper runs where they compete for cores
    priority: lambda w: TRAINING_ORDER[w.run]
    conda:
        CONDA_ENV
    threads: 2
    resources:
        gpu=lambda w: min(run_gpus(w.run), 1),
    params:
        json=lambda w: as_json(
            {
                **with_floats(config["eval"], "eval"),
                "device": RUN_TABLE[w.run]["train_config"]["device"],
                "precision": RUN_TABLE[w.run]["train_config"]["precision"],
                "cuda_graph": RUN_TABLE[w.run]["train_config"]["compile"],
            }
        ),
    shell:
        "python workflow_scripts/evaluate_model.py --name {wildcards.run} --checkpoint {input.best} "
        "--tokenizer {input.tokenizer} --val-bin {input.validation} --test-bin {input.test} "
        "--out {output.metrics} --threads {threads} --params {params.json:q}"
        f"{TO_LOG_AND_TERMINAL}"


# One figure per sweep, two per MoE run (rule summarize); refused where two would share a name.
SWEEP_PLOTS, MOE_PLOTS = plainly(
    summary_figures, PLOTS, config.get("sweeps") or {}, MOE_RUNS
)
# What rule summarize reads of each run, in the run table's order: its input and its runs parameter.
RUN_METRICS = expand(rules.evaluate_model.output.metrics, run=list(RUN_TABLE))
RUN_HISTORIES = expand(rules.train_model.output.history, run=list(RUN_TABLE))
RUN_CONFIGS = expand(rules.train_model.output.config, run=list(RUN_TABLE))


rule summarize:
    input:
        metrics=RUN_METRICS,
        history=RUN_HISTORIES,
        config=RUN_CONFIGS,
    output:
        csv=report(
            f"{RESULTS}/summary.csv",
            caption="../report/summary.rst",
            category="1. Summary",
            labels={"table": "summary.csv: one row per run (download)"},
        ),
        by_setting_csv=report(
            f"{RESULTS}/summary_by_setting.csv",
            caption="../report/summary.rst",
            category="1. Summary",
            labels={"table": "summary_by_setting.csv: one row per setting (download)"},
        ),
        comparison_csv=report(
            f"{RESULTS}/summary_vs_reference.csv",
            caption="../report/summary.rst",
            category="1. Summary",
            labels={
                "table": "summary_vs_reference.csv: each setting against the reference (download)"
            },
        ),
        table=report(
            f"{PLOTS}/summary.html",
            caption="../report/summary.rst",
            category="1. Summary",
            labels={"table": "summary tables"},
        ),
        run_settings=report(
            f"{PLOTS}/run_settings.html",
            caption="../report/run_settings.rst",
            category="1. Summary",
            labels={"table": "run settings, as recorded"},
        ),
        sweeps=[
            report(
                path,
                caption="../report/sweep.rst",
                category=f"2. Sweep {s}",
                labels={"figure": f"sweep {s}: validation loss and bits per byte"},
            )
            for s, path in SWEEP_PLOTS.items()
        ],
        loss_vs_step=report(
            f"{PLOTS}/loss_vs_step.png",
            caption="../report/loss_vs_step.rst",
            category="3. Training curves",
            labels={"figure": "loss against step"},
        ),
        loss_vs_time=report(
            f"{PLOTS}/loss_vs_time.png",
            caption="../report/loss_vs_time.rst",
            category="3. Training curves",
            labels={"figure": "loss against wall-clock time"},
        ),
        samples=report(
            f"{PLOTS}/samples.html",
            caption="../report/samples.rst",
            category="4. Samples",
            labels={"page": "generated samples"},
        ),
        expert_load=[
            report(
                MOE_PLOTS[r]["expert_load"],
                caption="../report/expert_load.rst",
                category="5. Mixture of experts",
                subcategory=r,
                labels={"figure": "expert load per layer"},
            )
            for r in MOE_RUNS
        ],
        dropped=[
            report(
                MOE_PLOTS[r]["dropped"],
                caption="../report/dropped.rst",
                category="5. Mixture of experts",
                subcategory=r,
                labels={"figure": "dropped tokens and router losses"},
            )
            for r in MOE_RUNS
        ],
    log:
        f"{LOGS}/summarize.log",
    benchmark:
        f"{BENCHMARKS}/summarize.tsv"
    conda:
        CONDA_ENV
    params:
        # The runs in the run table's order (a list: as_json sorts an object's keys); the sweeps
        # with their keys in the order the grid lists them, the first along x. Values, not functions
        # of the input (see below): a grid point moved to another sweep keeps its run and its files,
        # and must redraw both sweeps.
        runs=as_json(
            [
                {
                    "run": r,
                    "history": h,
                    "config": c,
                    "metrics": m,
                    **{
                        k: RUN_TABLE[r][k]
                        for k in ("model", "setting", "seed", "sweep", "values")
                    },
                }
                for r, h, c, m in zip(
                    RUN_TABLE, RUN_HISTORIES, RUN_CONFIGS, RUN_METRICS, strict=True
                )
            ]
        ),
        # A value, not a function of the outputs: Snakemake's rerun check skips params derived from
        # input or output, and reordering a grid's keys (which one is along x) must redraw the plot.
        sweeps=as_json(
            {
                s: {"plot": path, "keys": list(config["sweeps"][s]["grid"])}
                for s, path in SWEEP_PLOTS.items()
            }
        ),
        moe_plots=moe_plot_outputs,
        # none without a reference (the flag's value would be an empty word)
        reference=f"--reference {REFERENCE}" if REFERENCE else "",
    shell:
        "python workflow_scripts/summarize.py --runs {params.runs:q} --runs-csv {output.csv} "
        "--by-setting-csv {output.by_setting_csv} --comparison-csv {output.comparison_csv} "
        "{params.reference} --table {output.table} "
        "--run-settings {output.run_settings} --samples {output.samples} "
        "--loss-vs-step {output.loss_vs_step} --loss-vs-time {output.loss_vs_time} "
        "--sweeps {params.sweeps:q} --moe-plots {params.moe_plots:q}"
        f"{TO_LOG_AND_TERMINAL}"
