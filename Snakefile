# tinylm: TinyStories text -> tokenizer.json -> packed tokens -> best_model.pt -> metrics.json
#
#   snakemake --cores 4 artifacts/runs/condor/metrics.json     one model, whole chain
#   snakemake --cores 4 --configfile config/demo.yaml          everything, offline, synthetic stories
#   snakemake --profile profiles/slurm                          every model on a SLURM cluster
#   snakemake --cores 1 verify                                  re-hash every artifact

import os
import sys

from snakemake.utils import min_version

# 9.17: a rule's priority may depend on its wildcards (train_model, evaluate_model).
min_version("9.17")

# The library of this checkout, installed or not.
sys.path.insert(0, os.path.join(workflow.basedir, "lib"))
from tinylm.errors import ConfigError
from tinylm.workflow import check_yaml_syntax

# The defaults, the scripts and the data paths are relative to the checkout. From another folder
# (snakemake -s .../Snakefile) Snakemake skips a missing config/config.yaml when --configfile is
# given, and the config would fail as if incomplete: say where to run instead.
BASE_CONFIG = "config/config.yaml"
if not os.path.isfile(BASE_CONFIG):
    raise ConfigError(
        f"{os.path.abspath(BASE_CONFIG)}: not found, so this is not the tinylm checkout; run snakemake "
        f"from the checkout ({workflow.basedir}), or add -d {workflow.basedir}"
    )
# Snakemake's message for a YAML mistake names neither the file nor the line; this one does, and
# needs no traceback into the library (as plainly() in rules/common.smk, which is read only after the
# configfile below, and the linter wants no functions in this file).
try:
    check_yaml_syntax(BASE_CONFIG)
except ConfigError as e:
    raise ConfigError(str(e)) from None


configfile: BASE_CONFIG


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/eval.smk"


# Light rules run where Snakemake runs, not as cluster jobs.
localrules:
    all,
    summarize,
    verify,


rule all:
    default_target: True
    input:
        expand(rules.evaluate_model.output.metrics, run=list(RUN_TABLE)),
        # every run's training outputs too: Snakemake remakes a missing file only where a job that
        # runs needs it, so a run's deleted metrics.jsonl, config.json or best_model.pt (which
        # `snakemake verify` names) would otherwise stay missing under its metrics.json and the summary
        expand(rules.train_model.output, run=list(RUN_TABLE)),
        # every output of summarize: one that a newer version adds is built on older results too
        rules.summarize.output,
