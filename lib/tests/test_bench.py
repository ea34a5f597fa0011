"""python -m tinylm.bench on the CPU at small sizes: the figures it prints and the JSON it writes."""

import json
import re

import pytest
import torch

from tinylm import bench


def test_bench_times_each_model_mode_and_batch_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    bench.main(["--models", "condor", "falcon", "--batch-sizes", "2", "3", "--steps", "2", "--warmup", "1",
                "--eval-rows", "6", "--eval-batch", "4", "--modes", "eager", "compiled", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert "# tinylm.bench on cpu" in out and "no stated peak for CPUs" in out
    assert "| kind | model | mode | batch | tokens/s | ms/step or s/pass | MFU | peak RSS (GiB) |" in out
    data = json.loads(out_json.read_text())
    train = [r for r in data["results"] if r["kind"] == "train"]
    evals = [r for r in data["results"] if r["kind"] == "eval"]
    assert sorted((r["model"], r["mode"], r["batch"]) for r in train) == sorted(
        (m, mode, b) for m in ("condor", "falcon") for mode in ("eager", "compiled") for b in (2, 3))
    for r in train:
        assert r["tokens_per_sec"] > 0 and r["ms_per_step"] > 0 and r["mfu"] is None and not r["graph"]
        assert r["peak_mem_gib"] > 0.05  # the process's resident set: torch alone holds more
        assert r["tokens_per_sec"] == pytest.approx(r["batch"] * data["env"]["seq_len"] * 1000 / r["ms_per_step"])
        assert 0 < r["mean_loss"] < 2 * 9.1  # ln(8192) = 9.01 at initialization
        line = f"train {r['model']:9s} {r['mode']:8s} batch {r['batch']:5d}:"
        assert line in out
    assert len(evals) == 4 and all(r["rows"] == 6 and r["evaluated"] == "plain" for r in evals)
    for r in evals:  # a random-init model's loss is near ln(vocab)
        assert abs(r["loss"] - r["expected_loss_random_init"]) < 1.0
    # fewer rows than --eval-batch: the pass's batch is the rows, in the JSON and the table alike
    small = bench.main(["--models", "condor", "--batch-sizes", "2", "--steps", "1", "--warmup", "0", "--eval-rows", "3",
                        "--eval-batch", "4", "--modes", "eager", "--json", str(out_json)])
    assert small is None and [r["batch"] for r in json.loads(out_json.read_text())["results"] if r["kind"] == "eval"] == [3]
    assert "| eval | condor | eager | 3 |" in capsys.readouterr().out


def test_json_goes_into_a_folder_not_made_yet(tmp_path):
    # it ended the benchmark, its figures measured, in a FileNotFoundError traceback
    out_json = tmp_path / "figures" / "bench.json"
    bench.main(["--models", "condor", "--batch-sizes", "2", "--steps", "1", "--warmup", "0", "--eval-rows", "3",
                "--eval-batch", "4", "--modes", "eager", "--json", str(out_json)])
    assert [r["kind"] for r in json.loads(out_json.read_text())["results"]] == ["train", "eval"]


def test_each_measurement_compiles_afresh(tmp_path, monkeypatch):
    # All models share GPT.forward; without a reset the ninth compilation of a whole benchmark hit
    # dynamo's recompile limit and silently ran the plain model.
    resets = []
    monkeypatch.setattr(bench.torch.compiler, "reset", lambda: resets.append(1))
    bench.main(["--models", "condor", "baseline", "--batch-sizes", "2", "3", "--steps", "1", "--warmup", "0",
                "--eval-rows", "4", "--eval-batch", "4", "--modes", "compiled", "--json", str(tmp_path / "b.json")])
    measurements = json.loads((tmp_path / "b.json").read_text())["results"]
    assert len(measurements) == 6 and len(resets) == len(measurements)


def test_fp32_residual_flag_reaches_every_model_config(tmp_path, monkeypatch):
    seen = []
    real = bench.bench_train
    monkeypatch.setattr(bench, "bench_train", lambda mp, *a, **k: (seen.append(mp), real(mp, *a, **k))[1])
    bench.main(["--models", "condor", "baseline", "--batch-sizes", "2", "--steps", "1", "--warmup", "0",
                "--eval-rows", "4", "--eval-batch", "4", "--fp32-residual", "--json", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text())["env"]["fp32_residual"] is True
    assert len(seen) == 2 and all(mp["fp32_residual"] is True for mp in seen)


def test_bench_full_run_trains_through_train(tmp_path, capsys):
    out_json = tmp_path / "full.json"
    bench.main(["--full-run", "condor", "--full-run-stories", "200", "40", "--full-run-steps", "3",
                "--full-run-dir", str(tmp_path / "run"), "--json", str(out_json)])
    out = capsys.readouterr().out
    (run,) = json.loads(out_json.read_text())["full_runs"]
    assert run["model"] == "condor" and run["final_step"] == 3 and run["max_steps"] == 3
    assert run["train_wall_sec"] <= run["call_sec"] and run["train_tokens_per_sec"] > 0
    assert "full run condor: 3 steps" in out
    # 3 steps log fewer than two train lines: no steady pace to give, said in words rather than as "nan ms/step"
    assert "nan" not in out and "steps: fewer than two train lines logged" in out
    # the untrained model at step 0, then the last step; each eval line of metrics.jsonl has its seconds
    assert run["n_evals"] == 2 and run["first_eval_sec"] > 0
    assert (tmp_path / "run" / "run" / "condor" / "checkpoints" / "best_model.pt").is_file()


def test_full_run_time_split_separates_start_up_from_steady_steps(tmp_path):
    """Four train lines of 100 steps (batch 2 x 8 tokens): the first slow (it compiled), the rest at
    1 ms/step; two evaluations, the first compiling."""
    lines = [{"kind": "train", "step": 100 * i, "tokens_per_sec": 16 / (0.051 if i == 1 else 0.001)} for i in (1, 2, 3, 4)]
    lines += [{"kind": "eval", "step": 200, "sec": 3.0}, {"kind": "eval", "step": 400, "sec": 0.5},
              {"kind": "done", "final_step": 400, "train_sec": 5.4}]
    history = tmp_path / "metrics.jsonl"
    history.write_text("".join(json.dumps(row) + "\n" for row in lines))
    split = bench.time_split(history, batch=2, seq_len=8)
    assert split["steady_ms_per_step"] == pytest.approx(1.0)
    assert split["startup_sec"] == pytest.approx(5.0)  # 5.4 s of steps, 0.4 s of them steady
    assert (split["first_eval_sec"], split["other_evals_sec"], split["n_evals"]) == (3.0, 0.5, 2)


def test_config_is_layered_over_the_default_as_snakemake_does(tmp_path):
    """--config config/demo.yaml means what `snakemake --configfile config/demo.yaml` means: the
    demo's settings over config/config.yaml's (its models name only their training overrides)."""
    root = bench.DEFAULT_CONFIG.parent
    args = ["--models", "condor", "--batch-sizes", "2", "--steps", "1", "--warmup", "0", "--eval-rows", "4",
            "--eval-batch", "4", "--modes", "eager"]
    figures = {}
    for name in ("config.yaml", "demo.yaml"):
        bench.main(["--config", str(root / name), *args, "--json", str(tmp_path / f"{name}.json")])
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["env"]["config"] == [str(root / name)]
        (train,) = [r for r in data["results"] if r["kind"] == "train"]
        figures[name] = train["n_params"]
    # condor's shape is config.yaml's in both; the demo's vocabulary is 2048 words, not 8192
    d_model = 256
    assert figures["config.yaml"] - figures["demo.yaml"] == (8192 - 2048) * d_model


def test_a_missing_or_malformed_config_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--config", str(tmp_path / "nothing.yaml"), "--models", "condor"])
    assert f"--config {tmp_path / 'nothing.yaml'}: no such file" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- d_model: 64\n")
    with pytest.raises(SystemExit):
        bench.main(["--config", str(tmp_path / "list.yaml"), "--models", "condor"])
    assert f"--config {tmp_path / 'list.yaml'}: holds a list, not settings" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "message"), [
    (b"train:\n  lr: [1\n  batch_size: 3\n", r"bad\.yaml, line 3, column 13: .*fix the YAML there"),
    ("results_dir: caf\u00e9\n".encode("latin-1"), r"bad\.yaml: not UTF-8 text"),
])
def test_a_config_file_that_does_not_parse_is_named_with_its_line(tmp_path, capsys, content, message):
    (tmp_path / "bad.yaml").write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--config", str(tmp_path / "bad.yaml"), "--models", "condor"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.search(f"--config .*{message}", err) and "Traceback" not in err, err


@pytest.mark.parametrize(("text", "args", "message"), [
    ("train: {max_step: 100}\n", [], r"--config .*typo\.yaml: unknown key 'max_step' in train \(did you mean 'max_steps'\?\)"),
    ("", ["--models", "condr"], r"--models condr: not a model of the config \(baseline, falcon, condor\)"),
    ("", ["--full-run", "condr"], r"--full-run condr: not a model of the config"),
])
def test_a_bad_setting_or_model_name_is_one_error_line(tmp_path, capsys, text, args, message):
    (tmp_path / "typo.yaml").write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--config", str(tmp_path / "typo.yaml"), "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.search(message, err) and "Traceback" not in err, err


def test_a_device_that_is_not_here_is_one_error_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda", "--models", "condor"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--device = 'cuda' but no CUDA GPU is visible" in err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("argv", [["--batch-sizes", "0"], ["--steps", "0"], ["--eval-rows", "-1"], ["--warmup", "-2"],
                                  ["--seq-len", "0"], ["--full-run-steps", "0"]])
def test_bench_refuses_a_count_below_its_least_naming_the_option(argv, capsys):
    # --batch-sizes 0 ended in a traceback; --steps 0 silently ran the default 3 steps
    from tinylm.bench import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"argument {argv[0]}: {argv[1]} is not >=" in capsys.readouterr().err


def test_a_slow_rate_is_printed_as_a_figure_not_zero(tmp_path, capsys, monkeypatch):
    # On a laptop CPU baseline and falcon train at a few hundred tokens/s: printed to three decimals
    # of a million, both read "0.000 M tok/s" in the lines and the table.
    monkeypatch.setattr(bench, "bench_train", lambda *a, **k: {
        "tokens_per_sec": 370.0, "ms_per_step": 2767.0, "flops_per_token": 1.0, "peak_mem_gib": 0.65})
    monkeypatch.setattr(bench, "bench_eval", lambda *a, **k: {
        "tokens_per_sec": 4800.0, "sec": 1.7, "rows": 64, "evaluated": "plain"})
    bench.main(["--models", "baseline", "--batch-sizes", "8", "--modes", "eager", "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert not re.search(r"\b0\.000 ?M\b", out), out
    assert "0.00037 M tok/s" in out and "| 0.00037M |" in out, out
    assert "(0.0048 M tok/s)" in out and "| 0.0048M |" in out, out


@pytest.mark.parametrize(
    ("name", "tflops"),  # dense bf16 tensor-core peaks: half the datasheets' figures "with sparsity"
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # SXM5: 1,979 sparse
        ("NVIDIA H100 PCIe", 756.0),  # 1,513 sparse
        ("NVIDIA H100 NVL", 835.0),  # 1,671 sparse
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
    ],
)
def test_mfu_peak_is_the_variant_s_own(monkeypatch, name, tflops):
    """The PCIe and NVL cards of a GPU family have lower clocks (and the PCIe H100 fewer SMs) than the SXM
    one: MFU against the SXM peak understated them by up to a quarter."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, text = bench.device_peak(torch.device("cuda"), None)
    assert peak == tflops and name in text


def test_a_seq_len_past_a_models_positions_is_one_error_line_before_any_timing(capsys, monkeypatch):
    # --seq-len above a model's max_seq_len ended the benchmark in a ValueError traceback from the model's forward
    monkeypatch.setattr(bench, "bench_train", lambda *a, **k: pytest.fail("timed a step"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--models", "condor", "baseline", "--seq-len", "256"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert ("--seq-len 256: more positions than models condor, baseline have (max_seq_len 128); give at most 128, "
            "or raise max_seq_len in a --config file") in err, err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_peak_that_is_not_a_positive_number_is_refused(value, capsys):
    # --peak-tflops -1 printed an MFU of -1.7%; 0 was taken for "not given"
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--models", "condor", "--peak-tflops", value])
    assert exit_info.value.code == 2
    assert f"argument --peak-tflops: {value} is not a number > 0" in capsys.readouterr().err
