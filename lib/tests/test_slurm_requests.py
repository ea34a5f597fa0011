"""check_jobs_fit refuses what no node can hold, reading nodes from sinfo's output."""

import pytest

from tinylm.errors import ConfigError
from tinylm.slurm import Node, check_jobs_fit, job_request, parse_sinfo

# sinfo --noheader --Node --format="%N %P %c %m %l %G": one line per node and partition
SINFO = """\
cpu01 cpu* 64 256000 infinite (null)
cpu02 cpu* 128 512000+ infinite (null)
gpu01 gpu 32 192000 2-00:00:00 gpu:a100:4(S:0-1)
gpu02 gpu 48 384000 2-00:00:00 gpu:h100:8(S:0-1),gpu:a100:2
big01 cpu* 16 2048000 infinite (null)
short01 short 64 256000 30:00 (null)
"""


@pytest.fixture
def nodes():
    return parse_sinfo(SINFO)


def test_sinfo_lines_become_nodes(nodes):
    assert nodes[1] == Node("cpu02", "cpu", True, 128, 512000, {}, None)
    assert nodes[2] == Node("gpu01", "gpu", False, 32, 192000, {"a100": 4}, 2 * 24 * 3600)
    assert nodes[3].gpus == {"h100": 8, "a100": 2}
    assert nodes[5].time_limit_sec == 30 * 60
    assert parse_sinfo("vm debug* 2 23593 infinite gpu:fake:1\n")[0].gpus == {"fake": 1}
    assert parse_sinfo("n1 p 4 100 infinite gpu:2\n")[0].gpus == {"": 2}


@pytest.mark.parametrize("text, seconds", [("infinite", None), ("UNLIMITED", None), ("n/a", None), ("45", 45 * 60),
                                           ("30:15", 30 * 60 + 15), ("4:00:00", 4 * 3600), ("1-12", 36 * 3600),
                                           ("1-12:30", 36 * 3600 + 1800), ("7-00:00:00", 7 * 86400)])  # fmt: skip
def test_partition_time_limits_read_as_sinfo_writes_them(text, seconds):
    assert parse_sinfo(f"n1 p 4 100 {text} (null)\n")[0].time_limit_sec == seconds


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
        job_request("e", 1, {"runtime": 10**6}),  # the default partition has no time limit
        job_request("f", 1, {"runtime": 30, "slurm_partition": "short"}),
    ], nodes)  # fmt: skip


@pytest.mark.parametrize(
    "rule, threads, resources, message",
    [
        ("train_tokenizer", 256, {}, r"256 CPUs, node cpu02 has 128 \(lower its threads"),
        ("pack", 1, {"cpus_per_task": 200}, r"200 CPUs, node cpu02 has 128 \(lower set-resources: pack: cpus_per_task\)"),
        ("pack", 1, {"mem_mb": 4000000}, r"4000000 MB of memory, node big01 has 2048000 \(lower set-resources: pack: mem_mb\)"),
        ("train_model", 1, {"gpu": 1}, r"1 GPUs, node cpu01 has 0 \(lower its gpu resource: train.gpus, or train.device: cpu for none\)"),
        ("train_model", 1, {"gpu": 4, "cpus_per_gpu": 16, "slurm_partition": "gpu"},
         r"in partition gpu has: 64 CPUs, node gpu02 has 48 \(lower set-resources: train_model: cpus_per_gpu\)$"),
        ("train_model", 1, {"gpu": 3, "gpu_model": "a100", "slurm_partition": "gpu", "mem_mb": 300000},
         r"asks for 1 CPUs, 300000 MB of memory, 3 a100 GPUs on one node; no node in partition gpu has all of them"),
        ("x", 1, {"slurm_partition": "nope"}, r"asks for partition nope, which sinfo does not list"),
        # sbatch: a time limit above the partition's leaves the job pending, possibly for ever
        ("train_model", 1, {"runtime": 240, "slurm_partition": "short"},
         r"240 minutes of run time, partition short allows 30 \(lower set-resources: train_model: runtime\)"),
        ("train_model", 1, {"gpu": 1, "runtime": 3000, "slurm_partition": "gpu"},
         r"3000 minutes of run time, partition gpu allows 2880 \(lower set-resources: train_model: runtime\)"),
    ],
    ids=["threads", "cpus_per_task", "memory", "gpus", "cpus_per_gpu", "not-together", "partition", "runtime",
         "runtime-gpu"],
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


def test_a_list_of_partitions_fits_where_a_node_of_any_of_them_does(nodes):
    """sbatch -p cpu,gpu runs the job in whichever listed partition can start it soonest."""
    check_jobs_fit([job_request("train_model", 1, {"gpu": 8, "slurm_partition": "cpu,gpu"}),
                    job_request("pack", 128, {"slurm_partition": "short,cpu"})], nodes)
    with pytest.raises(ConfigError, match=r"rule x asks for partition nope, which sinfo does not list"):
        check_jobs_fit([job_request("x", 1, {"slurm_partition": "cpu,nope"})], nodes)
    with pytest.raises(ConfigError, match=r"in partitions short,gpu has: 256 CPUs, node short01 has 64"):
        check_jobs_fit([job_request("pack", 256, {"slurm_partition": "short,gpu"})], nodes)
