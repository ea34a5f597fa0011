"""check_jobs_fit refuses what no node can hold, reading nodes from sinfo's output."""

import pytest

from tinylm.errors import ConfigError
from tinylm.slurm import Node, check_jobs_fit, job_request, parse_sinfo

# sinfo --noheader --Node --format="%N %P %c %m %G": one line per node and partition
SINFO = """\
cpu01 cpu* 64 256000 (null)
cpu02 cpu* 128 512000+ (null)
gpu01 gpu 32 192000 gpu:a100:4(S:0-1)
gpu02 gpu 48 384000 gpu:h100:8(S:0-1),gpu:a100:2
big01 cpu* 16 2048000 (null)
"""


@pytest.fixture
def nodes():
    return parse_sinfo(SINFO)


def test_sinfo_lines_become_nodes(nodes):
    assert nodes[1] == Node("cpu02", "cpu", True, 128, 512000, {})
    assert nodes[2] == Node("gpu01", "gpu", False, 32, 192000, {"a100": 4})
    assert nodes[3].gpus == {"h100": 8, "a100": 2}
    assert parse_sinfo("vm debug* 2 23593 gpu:fake:1\n")[0].gpus == {"fake": 1}
    assert parse_sinfo("n1 p 4 100 gpu:2\n")[0].gpus == {"": 2}


def test_requests_follow_what_the_slurm_plugin_submits():
    assert job_request("r", 4, {"mem_mb": 1000}).cpus == 4  # --cpus-per-task = threads
    assert job_request("r", 4, {"cpus_per_task": 16}).cpus == 16
    assert job_request("r", 4, {"cpus_per_task": -1}).cpus == 0  # no CPU flag at all
    gpu = job_request("train_model", 4, {"gpu": 2, "cpus_per_gpu": 8, "gpu_model": "a100"})
    assert (gpu.cpus, gpu.gpus, gpu.gpu_model) == (16, 2, "a100")
    assert job_request("r", 1, {"cpus_per_gpu": 8}).cpus == 1  # cpus_per_gpu needs a GPU
    gres = job_request("r", 1, {"gres": "gpu:h100:3"})
    assert (gres.gpus, gres.gpu_model) == (3, "h100")
    assert job_request("r", 2, {"mem_mb": 1, "mem_mb_per_cpu": 1000}).mem_mb == 2000
    assert job_request("r", 1, {"slurm_partition": "gpu"}).partition == "gpu"


def test_what_some_node_holds_passes(nodes):
    check_jobs_fit([
        job_request("a", 128, {"mem_mb": 500000}),  # cpu02, the default partition
        job_request("b", 1, {"mem_mb": 2000000}),  # big01
        job_request("c", 1, {"gpu": 8, "cpus_per_gpu": 6, "slurm_partition": "gpu"}),  # gpu02
        job_request("d", 1, {"gpu": 4, "gpu_model": "a100", "slurm_partition": "gpu"}),  # gpu01
    ], nodes)  # fmt: skip


@pytest.mark.parametrize(
    "rule, threads, resources, message",
    [
        ("train_tokenizer", 256, {}, r"256 CPUs, node cpu02 has 128 \(lower its threads"),
        ("pack", 1, {"cpus_per_task": 200}, r"200 CPUs, node cpu02 has 128 \(lower set-resources: pack: cpus_per_task\)"),
        ("pack", 1, {"mem_mb": 4000000}, r"4000000 MB of memory, node big01 has 2048000 \(lower set-resources: pack: mem_mb\)"),
        ("train_model", 1, {"gpu": 1}, r"1 GPUs, node cpu01 has 0 \(lower its gpu resource, which train_model takes from train.gpus\)"),
        ("train_model", 1, {"gpu": 4, "cpus_per_gpu": 16, "slurm_partition": "gpu"},
         r"in partition gpu has: 64 CPUs, node gpu02 has 48 \(lower set-resources: train_model: cpus_per_gpu\)$"),
        ("train_model", 1, {"gpu": 3, "gpu_model": "a100", "slurm_partition": "gpu", "mem_mb": 300000},
         r"asks for 1 CPUs, 300000 MB of memory, 3 a100 GPUs on one node; no node in partition gpu has all of them"),
        ("x", 1, {"slurm_partition": "nope"}, r"asks for partition nope, which sinfo does not list"),
    ],
    ids=["threads", "cpus_per_task", "memory", "gpus", "cpus_per_gpu", "not-together", "partition"],
)  # fmt: skip
def test_a_request_no_node_can_hold_is_refused_naming_rule_resource_and_node(nodes, rule, threads, resources,
                                                                            message):  # fmt: skip
    with pytest.raises(ConfigError, match=rf"(?m)^  rule {rule} .*{message}"):
        check_jobs_fit([job_request("fine", 1, {}), job_request(rule, threads, resources)], nodes)


def test_every_problem_is_listed_once(nodes):
    jobs = [job_request("pack", 500, {}) for _ in range(3)] + [job_request("train", 1, {"mem_mb": 10**8})]
    with pytest.raises(ConfigError) as err:
        check_jobs_fit(jobs, nodes)
    lines = str(err.value).splitlines()
    assert "none was submitted" in lines[0]
    assert [line.split()[1] for line in lines[1:]] == ["pack", "train"]
