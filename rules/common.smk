# Config validation, the run table, path helpers and wildcard constraints.
import json
import os
import re
import shlex

from snakemake.logging import logger
from snakemake.utils import validate

# The library of this checkout: the Snakefile puts LIB first on sys.path.
from tinylm.config import progress_interval
from tinylm.errors import ConfigError, TinyLMError
from tinylm.slurm import check_jobs_fit, job_request, query_nodes
from tinylm.workflow import (
    check_config,
    config_error_source,
    command_line,
    check_configfiles,
    check_configfile_options,
    check_yaml_syntax,
    check_targets,
    check_data_settings,
    check_inputs,
    check_report_ready,
    check_report_current,
    check_checkpoints_unchanged,
    check_resumes,
    check_gpus_given,
    dry_run_warnings,
    check_runs_free,
    data_warnings,
    check_cuda_here,
    check_results_owner,
    build_command,
    record_results_owner,
    results_owner,
    data_params,
    expand_runs,
    reference_setting,
    run_warnings,
    split_record_only,
    summary_figures,
    training_order,
    with_floats,
)

LIB = os.path.join(workflow.basedir, "lib")
# Targets and --forceall as typed (Snakemake hands them over only after reading the workflow).
COMMAND_LINE = command_line() if workflow.is_main_process else None


def plainly(check, *args):
    """Run a check made before any job. Its refusal names the file and the fix, so it is raised again
    here, without the frames of the library's code under it (a traceback that says nothing more).
    """
    try:
        return check(*args)
    except TinyLMError as e:
        raise type(e)(str(e)) from None


# check_config names a bad key, its value and the rule it breaks, and checks what the schema cannot
# express; Snakemake's validate, which would print a schema dump instead, then fills in the defaults.
SCHEMA = workflow.source_path("../config/schema.yaml")


# A target typed after --configfile is read as a config file, and of two --configfile options only the
# last is read: refuse both, naming the files. A key given twice in one file (YAML keeps the last, and
# drops the first's settings without a word) is refused too, with its lines.
if workflow.is_main_process:
    plainly(check_configfile_options)
    plainly(check_configfiles, workflow.config_settings.configfiles, os.getcwd())
    for path in workflow.config_settings.configfiles:
        plainly(check_yaml_syntax, path)
# A refused setting is named with the config file and line that set it.
try:
    check_config(config, schema_path=SCHEMA)
except ConfigError as e:
    if not workflow.is_main_process:
        raise
    where = config_error_source(BASE_CONFIG, workflow.config_settings.configfiles, e)
    raise ConfigError(f"{where}{e}", key=e.key) from None
validate(config, schema="../config/schema.yaml")

# run name -> {model, setting, seed, sweep, values, model_config, train_config, ...}: every model at each of
# its seeds and every sweep's grid point at each of its seeds, one train_model and evaluate_model job
# each. tinylm.workflow.expand_runs says how runs are named.
RUN_TABLE = expand_runs(config, schema_path=SCHEMA)
# Each run's rank by estimated training compute: the priority of its training and evaluation, so
# trainings waiting for one GPU start costliest first (workflow.training_order).
TRAINING_ORDER = training_order(RUN_TABLE, config["packing"]["seq_len"])
# Packing goes before every training: the test split, which only evaluations read, would wait behind them.
# Snakemake's default scheduler starts the jobs whose priorities sum highest, so this outweighs them all.
PACK_PRIORITY = 2 * sum(TRAINING_ORDER.values()) + 1
# Say what the config may not mean: a sweep point at a model's own values and seed (the same training
# under a second name), a warm-up as long as the run.
if workflow.is_main_process:
    for warning in run_warnings(RUN_TABLE):
        logger.warning(warning)
# The setting that summarize compares every other one with (compare_to, else baseline, else none).
REFERENCE = reference_setting(config, RUN_TABLE)
CONDA_ENV = "../environment.yml"  # used with --use-conda; otherwise jobs run in the active environment

# Jobs import the library from this checkout, also inside environments made by --use-conda.
# (Snakemake formats the prefix too, hence the quadrupled braces in this f-string.) The download job
# refuses a split too small to fill one packed row (workflow_scripts/download_tinystories.py): it
# reads packing.seq_len here, as Snakemake reruns a rule whose command or params change, and a
# packing setting must not rebuild the raw data. LIB is quoted: a checkout path may hold a space.
shell.prefix(
    f"set -euo pipefail; export PYTHONPATH={shlex.quote(LIB)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
    f"export TINYLM_PACKING_SEQ_LEN={config['packing']['seq_len']}; "
)

# Ends every rule's shell command: stdout goes to the log; stderr (log lines, training progress, errors)
# to the log and the terminal, so a failure shows its own message with or without a profile. Both
# append (Snakemake removes a job's log before it starts), so neither overwrites the other; tee
# ignores INT and TERM so that a job stopping on a signal still gets its last lines out.
TO_LOG_AND_TERMINAL = " 2>&1 >> {log} | (trap '' INT TERM; exec tee -a {log} >&2)"

# Data and tokenizers are shared by every config that names them alike; a tokenizer and its packed
# tokens are keyed by the dataset too, so that one tokenizer name used on two datasets cannot clash.
DATA_KEY = f"{config['dataset']['name']}/{config['tokenizer']['name']}"
RAW = f"data/raw/{config['dataset']['name']}"
TOK = f"artifacts/tokenizers/{DATA_KEY}"
PROC = f"data/processed/{DATA_KEY}"
# Everything else lives under the config's results_dir, so that configs never overwrite each other.
# As typed it may end in a slash or start with a dot and a slash: every path below uses its plain form.
config["results_dir"] = os.path.normpath(config["results_dir"])
RESULTS = config["results_dir"]
# A target among another config's results, or of a run this config lacks: say what it makes.
CLI_TARGETS = (
    (getattr(COMMAND_LINE, "targets", None) or []) if workflow.is_main_process else []
)
if workflow.is_main_process:
    plainly(
        check_targets,
        CLI_TARGETS,
        RESULTS,
        RUN_TABLE,
        os.getcwd(),
        config["dataset"]["name"],
        config["tokenizer"]["name"],
    )
    # a report of everything, of results already built (not --report-after-run, not of some targets)
    if getattr(COMMAND_LINE, "report", None) and not (
        getattr(COMMAND_LINE, "report_after_run", False) or CLI_TARGETS
    ):
        plainly(check_report_ready, RESULTS, os.getcwd())
        plainly(check_report_current, RESULTS, os.getcwd(), RUN_TABLE, REFERENCE)
# Two configs naming one results_dir would retrain each other's runs: the config file that names it
# (not an override file layered over it) is recorded before the first job and a second one refused.
# `snakemake verify` only reads, so any config may check any results.
RESULTS_OWNER = (
    plainly(
        results_owner,
        BASE_CONFIG,
        workflow.config_settings.configfiles,
    )
    if workflow.is_main_process
    else None
)
if workflow.is_main_process and CLI_TARGETS != ["verify"]:
    plainly(
        check_results_owner,
        RESULTS,
        RESULTS_OWNER,
        (
            f"--config results_dir={workflow.config_settings.config['results_dir']}"
            if "results_dir" in workflow.config_settings.config
            else None
        ),
    )
RUNS = f"{RESULTS}/runs"
PLOTS = f"{RESULTS}/plots"
LOGS = f"{RESULTS}/logs"
BENCHMARKS = f"{RESULTS}/benchmarks"
MOE_RUNS = [r for r, run in RUN_TABLE.items() if run["model_config"]["ffn"] == "moe"]
SPLITS = ["train", "validation", "test"]

# Data shared by name must not be rebuilt with other settings under another config's runs (--forceall
# included). Snakemake deletes a job's outputs before the job checks its inputs: files on disk that
# disagree with their records are refused now, while the last good outputs exist (--forceall rebuilds them).
# The data rules' parameters, by rule; each data file records them, and check_data_settings compares.
# `snakemake verify` alone builds nothing: it reads and reports, so these checks do not stop it (the
# refusal of data built with other settings sends the user to it).
DATA_PARAMS = data_params(config)
DATA_DIRS = dict(raw_dir=RAW, tokenizer_dir=TOK, packed_dir=PROC, splits=SPLITS)
if workflow.is_main_process and CLI_TARGETS != ["verify"]:
    plainly(lambda: check_data_settings(config, **DATA_DIRS))
    for warning in data_warnings(config["dataset"]["source"], RAW):
        logger.warning(warning)
    if not getattr(COMMAND_LINE, "forceall", False):
        plainly(lambda: check_inputs(config, **DATA_DIRS))


def gpu_limit():
    """The `gpu` resource Snakemake was given (--resources gpu=N, a profile's resources), else None."""
    given = getattr(workflow, "global_resources", {}).get("gpu")
    return getattr(given, "value", given)


# A dry run skips onstart, whose checks need to know the jobs: warn of what they would refuse.
if workflow.is_main_process and getattr(COMMAND_LINE, "dryrun", False):
    for warning in plainly(dry_run_warnings, RUN_TABLE, RUNS, gpu_limit()):
        logger.warning(warning)


onstart:
    # A run that a live trainer holds (another Snakemake's job) is refused before any job starts, and
    # so is a run asking for more GPUs than Snakemake was given, an interrupted run's last.pt that its
    # training would refuse to resume (other settings), a best checkpoint to be evaluated as it is that
    # changed since training recorded it, a progress interval (from the environment) that the
    # training jobs would refuse, and, for jobs run on this machine, train.device: cuda without a GPU.
    if workflow.is_main_process:
        needrun = list(workflow.dag.needrun_jobs())
        training = {
            j.wildcards.run for j in needrun if j.rule.name == "train_model"
        }
        if training:
            plainly(progress_interval)
        to_train = {run: RUN_TABLE[run] for run in training}
        plainly(check_gpus_given, to_train, gpu_limit())
        if workflow.executor_plugin.name == "local":  # jobs on this machine
            plainly(
                check_cuda_here,
                {
                    j.wildcards.run: RUN_TABLE[j.wildcards.run]
                    for j in needrun
                    if j.rule.name in ("train_model", "evaluate_model")
                },
            )
        plainly(check_runs_free, [f"{RUNS}/{run}" for run in training])
        plainly(check_resumes, to_train, RUNS)
        plainly(
            check_checkpoints_unchanged,
            [
                f"{RUNS}/{j.wildcards.run}/checkpoints/best_model.pt"
                for j in needrun
                if j.rule.name == "evaluate_model"
                and j.wildcards.run not in training
            ],
        )
    # SLURM keeps a job that no node can hold pending for ever: refuse the run before submitting.
    if workflow.executor_plugin.name == "slurm":
        jobs = [j for j in workflow.dag.needrun_jobs() if not j.is_local]
        requests = [job_request(j.rule.name, j.threads, j.resources) for j in jobs]
        plainly(lambda: check_jobs_fit(requests, query_nodes()))
    # Every check passed: the first job is about to run, so this config now owns its results_dir.
    if workflow.is_main_process and CLI_TARGETS != ["verify"]:
        plainly(record_results_owner, RESULTS, RESULTS_OWNER)


wildcard_constraints:
    run="|".join(map(re.escape, RUN_TABLE)),
    split="|".join(SPLITS),


def as_json(obj):
    """Rule params travel to the scripts as one JSON argument; Snakemake reruns a rule when it changes
    (unless the param is a function of input or output, which its rerun check leaves out).
    """
    return json.dumps(obj, sort_keys=True)


def local_inputs(wildcards):
    ds = config["dataset"]
    if ds["source"] != "local":
        return []
    return [p for p in (ds["local"]["train"], ds["local"]["validation"]) if p]


def run_gpus(run):
    """The GPUs a run trains on: train.gpus, none for train.device: cpu (its jobs ask for none)."""
    train = RUN_TABLE[run]["train_config"]
    return 0 if train["device"] == "cpu" else train["gpus"]


def train_launcher(wildcards):
    gpus = RUN_TABLE[wildcards.run]["train_config"]["gpus"]
    if gpus == 1:
        return "python"
    # One job, N processes: torchrun sets RANK/WORLD_SIZE; see docs/cluster.md for several nodes.
    return f"python -m torch.distributed.run --standalone --nproc_per_node {gpus}"


def moe_plot_outputs(wildcards, output):
    """Rule summarize's MoE plots by run, so that the script writes exactly these paths."""
    pairs = zip(MOE_RUNS, output.expert_load, output.dropped, strict=True)
    return as_json({r: {"expert_load": e, "dropped": d} for r, e, d in pairs})
