# tinylm: TinyStories text -> tokenizer.json -> packed tokens -> best_model.pt -> metrics.json
#
#   snakemake --cores 4 artifacts/runs/condor/metrics.json     one model, whole chain
#   snakemake --cores 4 --configfile config/demo.yaml          everything, offline, synthetic stories
#   snakemake --profile profiles/slurm                          every model on a SLURM cluster
#   snakemake --cores 1 verify                                  re-hash every artifact

import os
import sys

# The library of this checkout, installed or not.
sys.path.insert(0, os.path.join(workflow.basedir, "lib"))
from tinylm.workflow import check_yaml_syntax

# Snakemake's message for a YAML mistake names neither the file nor the line.
BASE_CONFIG = "config/config.yaml"
check_yaml_syntax(BASE_CONFIG)


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
        # every output of summarize: one that a newer version adds is built on older results too
        rules.summarize.output,
