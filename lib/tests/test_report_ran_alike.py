"""Runs averaged or compared together that trained or were evaluated differently (device, precision,
compile, processes, CPU threads, torch, the evaluation's device and precision) are flagged in the
tables and on the summary page, from each run's own config.json and metrics.json; the numbers stay."""

import json
from pathlib import Path

import fake_runs
import pandas as pd
from fake_runs import summary_outputs as outputs

from tinylm.report import summarize_runs
from tinylm.report.records import hardware

H200 = "cuda:0 (NVIDIA H200)"


def fake(root: Path, setting: str, seed: int, device: str = "cpu", config: dict | None = None,
         train_config: dict | None = None, metrics: dict | None = None) -> tuple[str, dict]:
    """One run of `setting` at `seed` as its records would be after running on `device`;
    `config` and `metrics` update config.json and metrics.json."""
    run = f"{setting}-seed{seed}"
    run_dir = fake_runs.write_fake_run(root / run, run, seed=seed, device=device, floor=1.8 + 0.01 * seed,
                                       train_config=train_config)
    for name, update in (("config.json", config), ("metrics.json", metrics)):
        if update:
            path = run_dir / name
            path.write_text(json.dumps({**json.loads(path.read_text()), **update}))
    entry = {"history": run_dir / "metrics.jsonl", "metrics": run_dir / "metrics.json",
             "config": run_dir / "config.json", "model": setting, "setting": setting, "seed": seed,
             "sweep": None, "values": {}}
    return run, entry


def summarize(tmp_path: Path, runs: list[tuple[str, dict]], reference: str | None = "baseline"):
    summary = summarize_runs(dict(runs), reference=reference, **outputs(tmp_path, moe=()))
    page = (tmp_path / "plots" / "summary.html").read_text()
    return summary, page


def flags(frame: pd.DataFrame) -> dict[str, str]:
    """setting -> its ran_differently text ("" where empty), from a by-setting or comparison table."""
    return {row["setting"]: (row["ran_differently"] if isinstance(row["ran_differently"], str) else "")
            for row in frame.to_dict("records")}


def test_hardware_names_the_kind_of_device_not_its_index():
    assert hardware("cpu") == "cpu"
    assert hardware("cuda:0 (NVIDIA H200)") == hardware("cuda:3 (NVIDIA H200)") == "NVIDIA H200"
    assert hardware("cuda:0") == "cuda"  # a record without the GPU's name
    assert hardware(None) is None


def test_the_run_rows_say_how_each_run_ran(tmp_path):
    runs = [
        fake(tmp_path / "runs", "baseline", 1),
        fake(tmp_path / "runs", "baseline", 2, device=H200, config={"precision": "bf16", "world_size": 2},
             metrics={"precision": "bf16"}),
    ]
    summarize(tmp_path, runs, reference=None)
    on_disk = pd.read_csv(tmp_path / "summary.csv")
    cpu, gpu = on_disk.to_dict("records")
    assert (cpu["device"], cpu["precision"], cpu["compile"], cpu["processes"]) == ("cpu", "fp32", False, 1)
    assert (gpu["device"], gpu["precision"], gpu["compile"], gpu["processes"]) == (H200, "bf16", True, 2)
    assert (cpu["eval_device"], cpu["eval_precision"]) == ("cpu", "fp32")
    assert (gpu["eval_device"], gpu["eval_precision"]) == (H200, "bf16")


def test_seeds_of_one_setting_on_different_hardware_are_flagged_and_still_averaged(tmp_path):
    root = tmp_path / "runs"
    on_gpu = {"config": {"precision": "bf16"}, "metrics": {"precision": "bf16"}}
    runs = [
        fake(root, "baseline", 1, device=H200, **on_gpu),
        fake(root, "baseline", 2, device="cuda:1 (NVIDIA H200)", **on_gpu),  # another GPU of one kind
        fake(root, "condor", 1),  # resumed on a CPU node, say
        fake(root, "condor", 2, device=H200, **on_gpu),
        fake(root, "condor", 3, device=H200, **on_gpu),
    ]
    summary, page = summarize(tmp_path, runs)
    by_setting = pd.read_csv(tmp_path / "summary_by_setting.csv")
    within = flags(by_setting)
    assert within["baseline"] == ""
    assert "device: cpu (seed 1) / NVIDIA H200 (seeds 2, 3)" in within["condor"]
    assert "precision: fp32 (seed 1) / bf16 (seeds 2, 3)" in within["condor"]
    assert "compile: off (seed 1) / on (seeds 2, 3)" in within["condor"]
    assert "evaluation: cpu fp32 (seed 1) / NVIDIA H200 bf16 (seeds 2, 3)" in within["condor"]
    # A flag, not an exclusion: every ok run is still in the numbers.
    condor = by_setting.set_index("setting").loc["condor"]
    runs_csv = pd.read_csv(tmp_path / "summary.csv")
    assert condor["n"] == 3
    assert condor["val_loss_mean"] == runs_csv[runs_csv["setting"] == "condor"]["val_loss"].mean()

    comparison = pd.read_csv(tmp_path / "summary_vs_reference.csv")
    against = flags(comparison)
    assert "device: condor cpu (seed 1) / NVIDIA H200 (seeds 2, 3), baseline NVIDIA H200" in against["condor"]
    assert list(comparison["n"]) == [3] * 4

    assert "differ only in their seed" not in page
    assert "condor ⚠" in page
    assert "condor: device: cpu (seed 1) / NVIDIA H200 (seeds 2, 3)" in page


def test_a_setting_that_ran_unlike_its_reference_is_flagged(tmp_path):
    root = tmp_path / "runs"
    runs = [
        *(fake(root, "baseline", seed, device=H200, config={"precision": "bf16"},
               metrics={"precision": "bf16"}) for seed in (1, 2)),
        *(fake(root, "condor", seed) for seed in (1, 2)),
        *(fake(root, "falcon", seed, device=H200, config={"precision": "bf16"},
               metrics={"precision": "bf16"}) for seed in (1, 2)),
    ]
    summary, page = summarize(tmp_path, runs)
    assert set(flags(pd.read_csv(tmp_path / "summary_by_setting.csv")).values()) == {""}
    against = flags(pd.read_csv(tmp_path / "summary_vs_reference.csv"))
    assert against["falcon"] == ""
    assert "device: condor cpu, baseline NVIDIA H200" in against["condor"]
    assert "precision: condor fp32, baseline bf16" in against["condor"]
    assert "compile: condor off, baseline on" in against["condor"]
    # Within each setting the runs ran alike: the sentence holds; the comparison row is marked.
    assert "differ only in their seed" in page
    against_part = page.split("<h2>Against baseline</h2>", 1)[1].split("<h2>Runs</h2>", 1)[0]
    assert "condor ⚠" in against_part and "falcon ⚠" not in against_part
    assert "condor: device: condor cpu, baseline NVIDIA H200" in against_part


def test_processes_threads_torch_and_compile_count_too(tmp_path):
    root = tmp_path / "runs"
    gpu = {"precision": "bf16", "software": {"torch": "2.11.0"}}
    runs = [
        fake(root, "baseline", 1, config={"cpu_threads": 2}),
        fake(root, "baseline", 2, config={"cpu_threads": 4}),
        fake(root, "condor", 1, device=H200, config=gpu),
        fake(root, "condor", 2, device=H200, config={**gpu, "world_size": 2}),
        fake(root, "condor", 3, device=H200, config={**gpu, "software": {"torch": "2.10.0"}}),
        fake(root, "condor", 4, device=H200, config=gpu, train_config={"compile": False}),
    ]
    _, page = summarize(tmp_path, runs)
    within = flags(pd.read_csv(tmp_path / "summary_by_setting.csv"))
    assert "CPU threads: 2 (seed 1) / 4 (seed 2)" in within["baseline"]
    assert "processes: 1 (seeds 1, 3, 4) / 2 (seed 2)" in within["condor"]
    assert "torch: 2.11.0 (seeds 1, 2, 4) / 2.10.0 (seed 3)" in within["condor"]
    assert "compile: on (seeds 1, 2, 3) / off (seed 4)" in within["condor"]
    # CPU threads matter only where the run trained on the CPU; a run resumed at another count
    # records every count it computed with.
    assert "CPU threads" not in within["condor"]
    assert "differ only in their seed" not in page


def test_a_run_resumed_at_another_thread_count_records_both(tmp_path):
    root = tmp_path / "runs"
    runs = [fake(root, "baseline", 1, config={"cpu_threads": 4}),
            fake(root, "baseline", 2, config={"cpu_threads": 4, "cpu_threads_all": [2, 4]})]
    summarize(tmp_path, runs, reference=None)
    within = flags(pd.read_csv(tmp_path / "summary_by_setting.csv"))
    assert "CPU threads: 4 (seed 1) / 2 and 4 (seed 2)" in within["baseline"]


def test_left_out_runs_do_not_flag_the_runs_counted(tmp_path):
    root = tmp_path / "runs"
    runs = [fake(root, "baseline", 1), fake(root, "baseline", 2)]
    run, entry = fake(root, "baseline", 3, device=H200)
    (Path(entry["metrics"])).unlink()  # a failed run: no evaluation
    lines = Path(entry["history"]).read_text().splitlines()[:-1]  # no "done" line
    Path(entry["history"]).write_text("\n".join(lines) + "\n")
    _, page = summarize(tmp_path, [*runs, (run, entry)], reference=None)
    assert flags(pd.read_csv(tmp_path / "summary_by_setting.csv")) == {"baseline": ""}
    assert "differ only in their seed" in page


def test_a_run_resumed_on_another_device_counts_every_attempt(tmp_path):
    """config.json's device and precision are the last attempt's; ran_on_all lists every attempt's
    (tinylm.train): a run that trained on a GPU, then on the CPU, is unlike its GPU-only seeds."""
    root = tmp_path / "runs"
    gpu = {"device": H200, "precision": "bf16", "compile": True, "world_size": 1}
    cpu = {"device": "cpu", "precision": "fp32", "compile": False, "world_size": 1}
    runs = [fake(root, "baseline", 1, device=H200, config={"precision": "bf16"}),
            fake(root, "baseline", 2, config={"ran_on_all": [gpu, cpu]})]
    summarize(tmp_path, runs, reference=None)
    on_disk = pd.read_csv(tmp_path / "summary.csv")
    assert list(on_disk["device"]) == [H200, f"{H200}, then cpu"]
    assert list(on_disk["precision"]) == ["bf16", "bf16, then fp32"]
    assert list(on_disk["compile"].astype(str)) == ["True", "True, then False"]
    within = flags(pd.read_csv(tmp_path / "summary_by_setting.csv"))
    assert "device: NVIDIA H200 (seed 1) / NVIDIA H200, then cpu (seed 2)" in within["baseline"]
    assert "precision: bf16 (seed 1) / bf16, then fp32 (seed 2)" in within["baseline"]
    page = (tmp_path / "plots" / "run_settings.html").read_text()
    assert f"<td>{H200}, then cpu</td>" in page and "<td>bf16, then fp32</td>" in page
