"""The `tinylm` command: what it says about itself, and `tinylm evaluate` against evaluate_loss."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tinylm
from tinylm.__main__ import COMMANDS, main
from tinylm.checkpoint import model_from_checkpoint, save_checkpoint
from tinylm.data import load_tokenizer, open_packed, token_byte_lengths
from tinylm.evaluate import evaluate_loss
from tinylm.io import sha256_file
from tinylm.model import GPT, GPTConfig

EXPECTED_COMMANDS = ["generate", "evaluate", "bench", "verify", "check-config"]
LIB = Path(tinylm.__file__).resolve().parents[1]


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code or 0


def test_help_lists_every_command_with_one_line(capsys):
    assert run_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tinylm ")
    assert sorted(COMMANDS) == sorted(EXPECTED_COMMANDS)
    for name, (_, summary) in COMMANDS.items():
        lines = [line for line in out.splitlines() if line.split()[:1] == [name]]
        assert len(lines) == 1 and summary in lines[0], (name, out)


def test_python_dash_m_introduces_itself_as_tinylm():
    env = {**os.environ, "PYTHONPATH": str(LIB)}
    done = subprocess.run(
        [sys.executable, "-m", "tinylm", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tinylm ") and "python -m" not in done.stdout


def test_version_exits_0(capsys):
    assert run_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tinylm {tinylm.__version__}"


@pytest.mark.parametrize("argv", [["frobnicate"], ["frobnicate", "--help"]])
def test_unknown_command_exits_2_naming_it(argv, capsys):
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err
    assert all(name in err for name in EXPECTED_COMMANDS)


def test_no_command_is_a_usage_error(capsys):
    assert run_main([]) == 2
    assert "usage: tinylm " in capsys.readouterr().err


@pytest.mark.parametrize("command", EXPECTED_COMMANDS)
def test_every_command_has_help_under_its_own_name(command, capsys):
    assert run_main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: tinylm {command} ")


# -- tinylm evaluate --------------------------------------------------------------------------------


def save(path: Path, model: GPT, tokenizer_path: Path | None, tokenizer_sha256: str) -> Path:
    state = {
        "model_config": model.config.to_dict(),
        "model": model.state_dict(),
        "tokenizer_sha256": tokenizer_sha256,
        "step": 20,
    }
    if tokenizer_path is not None:
        state["tokenizer_path"] = str(tokenizer_path)
    save_checkpoint(path, state)
    return path


@pytest.fixture(scope="module")
def trained(tiny_packed, tiny_tokenizer_dir, tiny_train_model, tmp_path_factory) -> Path:
    """A checkpoint after 20 AdamW steps on the tiny training split, recording its tokenizer."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**tiny_train_model()))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = torch.from_numpy(np.asarray(open_packed(tiny_packed["train"]), dtype=np.int64))
    for step in range(20):
        batch = rows[
            torch.randint(0, len(rows), (8,), generator=torch.Generator().manual_seed(step))
        ]
        loss = model(batch[:, :-1], batch[:, 1:])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    tok = tiny_tokenizer_dir / "tokenizer.json"
    return save(tmp_path_factory.mktemp("run") / "best_model.pt", model, tok, sha256_file(tok))


def reference(checkpoint: Path, packed: Path, tokenizer_path: Path) -> dict:
    model, _ = model_from_checkpoint(checkpoint)
    byte_lengths = token_byte_lengths(load_tokenizer(tokenizer_path))
    return evaluate_loss(model, open_packed(packed), byte_lengths=byte_lengths)


def evaluate_json(argv: list[str], capsys) -> dict:
    assert run_main(["evaluate", *argv, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_a_packed_split_gives_evaluate_loss(
    trained, tiny_packed, tiny_tokenizer_dir, capsys
):
    want = reference(trained, tiny_packed["validation"], tiny_tokenizer_dir / "tokenizer.json")
    got = evaluate_json([str(trained), str(tiny_packed["validation"]), "--batch-size", "7"], capsys)
    assert want["loss"] < 5.5  # trained: below ln(512) = 6.24
    for key in ("loss", "ppl", "bpb"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert (got["tokens"], got["bytes"]) == (want["tokens"], want["bytes"])
    assert (got["device"], got["precision"]) == ("cpu", "fp32")  # as it ran: bf16 is CUDA only


def test_evaluate_a_text_file_packs_it_like_the_workflow(
    trained, tiny_raw, tiny_packed, tiny_tokenizer_dir, capsys
):
    want = reference(trained, tiny_packed["validation"], tiny_tokenizer_dir / "tokenizer.json")
    got = evaluate_json([str(trained), str(tiny_raw[0] / "validation.txt")], capsys)
    for key in ("loss", "ppl", "bpb", "tokens", "bytes"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_evaluate_stories_as_json_lines_like_the_same_text_file(trained, tiny_raw, tmp_path, capsys):
    # the "give .jsonl or .parquet" advice of a .txt without separators must lead somewhere
    from tinylm.data import read_stories

    stories = list(read_stories(tiny_raw[0] / "validation.txt"))
    lines = tmp_path / "validation.jsonl"
    lines.write_text("".join(json.dumps({"text": story}) + "\n" for story in stories))
    want = evaluate_json([str(trained), str(tiny_raw[0] / "validation.txt")], capsys)
    got = evaluate_json([str(trained), str(lines)], capsys)
    for key in ("loss", "ppl", "bpb", "tokens", "bytes"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_evaluate_a_text_file_packs_it_as_the_model_trained(trained, tiny_raw, tiny_tokenizer_dir, tmp_path, capsys):
    """A model trained on rows of 16 tokens (its checkpoint says so) with max_seq_len 32: the .txt is
    packed into rows of 16, as the workflow packed the split its metrics.json evaluated."""
    from tinylm.checkpoint import load_checkpoint
    from tinylm.data import pack_split

    tok = tiny_tokenizer_dir / "tokenizer.json"
    text = tiny_raw[0] / "validation.txt"
    ck = load_checkpoint(trained)
    assert ck["model_config"]["max_seq_len"] == 32
    save_checkpoint(tmp_path / "short.pt", {**{k: v for k, v in ck.items() if k != "format"}, "seq_len": 16})
    pack_split(text, tok, tmp_path / "validation16.bin", seq_len=16)
    want = reference(tmp_path / "short.pt", tmp_path / "validation16.bin", tok)
    got = evaluate_json([str(tmp_path / "short.pt"), str(text)], capsys)
    assert got["seq_len"] == 16
    for key in ("loss", "ppl", "bpb", "tokens", "bytes"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert evaluate_json([str(tmp_path / "short.pt"), str(text), "--seq-len", "8"], capsys)["seq_len"] == 8
    # positions 16-31 of its table never trained: longer rows are refused, as text or packed
    expect_error([str(tmp_path / "short.pt"), str(text), "--seq-len", "32"], capsys,
                 "--seq-len = 32 is more than the 16 positions the model trained on (its checkpoint's seq_len;")
    pack_split(text, tok, tmp_path / "validation32.bin", seq_len=32)
    capsys.readouterr()  # the packing's progress lines
    expect_error([str(tmp_path / "short.pt"), str(tmp_path / "validation32.bin")], capsys,
                 "validation32.bin: rows of 32 tokens, more than the 16 positions the model trained on")
    # a packed split has its rows: --seq-len, which would be ignored, is refused
    expect_error([str(tmp_path / "short.pt"), str(tmp_path / "validation16.bin"), "--seq-len", "8"], capsys,
                 "--seq-len 8: " + str(tmp_path / "validation16.bin") + " is packed into rows already")


def test_evaluate_an_moe_checkpoint_at_its_own_eval_batch_size_like_metrics_json(
    tiny_packed, tiny_tokenizer_dir, tiny_train_model, tmp_path, capsys
):
    """An MoE model's loss depends on the evaluation batch (capacity, token dropping): without
    --batch-size, `tinylm evaluate` uses the eval.batch_size its checkpoint records, the batch of the
    run's metrics.json, not the schema's default."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**tiny_train_model(ffn="moe", n_experts=4, top_k=2, capacity_factor=1.0)))
    tok = tiny_tokenizer_dir / "tokenizer.json"
    path = save(tmp_path / "moe.pt", model, tok, sha256_file(tok))
    ck = torch.load(path, weights_only=False)
    save_checkpoint(path, {**{k: v for k, v in ck.items() if k != "format"}, "eval_batch_size": 8})
    rows = open_packed(tiny_packed["validation"])
    byte_lengths = token_byte_lengths(load_tokenizer(tok))
    at = {bs: evaluate_loss(model_from_checkpoint(path)[0], rows, batch_size=bs, byte_lengths=byte_lengths)["loss"]
          for bs in (8, 512)}
    assert at[8] != pytest.approx(at[512], rel=1e-6)  # the batch matters for this model
    got = evaluate_json([str(path), str(tiny_packed["validation"])], capsys)
    assert got["loss"] == pytest.approx(at[8], rel=1e-6)
    assert got["batch_size"] == 8
    got = evaluate_json([str(path), str(tiny_packed["validation"]), "--batch-size", "512"], capsys)
    assert got["loss"] == pytest.approx(at[512], rel=1e-6)


def test_evaluate_prints_loss_perplexity_and_bits_per_byte(trained, tiny_packed, capsys):
    assert run_main(["evaluate", str(trained), str(tiny_packed["test"]), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for label in ("loss", "perplexity", "bits per byte"):
        assert label in out


def expect_error(argv: list[str], capsys, *fragments: str) -> None:
    assert run_main(["evaluate", *argv, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_evaluate_names_a_missing_checkpoint_or_input(trained, tiny_packed, tmp_path, capsys):
    expect_error(
        [str(tmp_path / "nope.pt"), str(tiny_packed["test"])],
        capsys,
        "nope.pt: checkpoint not found",
    )
    expect_error(
        [str(trained), str(tmp_path / "gone.bin")], capsys, "gone.bin: input file not found"
    )
    expect_error([str(tmp_path), str(tiny_packed["test"])], capsys,
                 f"{tmp_path}: a folder, not a checkpoint file; give the file (e.g. {tmp_path}/best_model.pt)")
    expect_error(
        [str(trained), str(tmp_path / "gone.txt")], capsys, "gone.txt: input file not found"
    )
    odd = tmp_path / "stories.csv"
    odd.write_text("a,b\n")
    expect_error([str(trained), str(odd)], capsys, "stories.csv", ".bin", ".txt")


def test_evaluate_refuses_a_text_column_for_a_file_without_columns(trained, tiny_raw, tiny_packed, capsys):
    # --text-column story with a .txt was ignored without a word: the user meant another file, or none
    for data in (tiny_raw[0] / "validation.txt", tiny_packed["test"]):
        expect_error([str(trained), str(data), "--text-column", "story"], capsys,
                     f"--text-column story: {data} has no columns ({data.suffix}); it names the field of a .jsonl, "
                     ".json or .parquet, so leave it out")


def test_evaluate_names_a_missing_or_other_tokenizer(
    trained, tiny_packed, tiny_tokenizer_dir, tmp_path, capsys
):
    model, ckpt = model_from_checkpoint(trained)
    bare = save(tmp_path / "bare.pt", model, None, ckpt["tokenizer_sha256"])
    expect_error([str(bare), str(tiny_packed["test"])], capsys, "bare.pt", "--tokenizer")
    expect_error(
        [str(trained), str(tiny_packed["test"]), "--tokenizer", str(tmp_path / "t.json")],
        capsys,
        "t.json: tokenizer not found; check the path --tokenizer gives",
    )
    other = tmp_path / "other.json"
    text = (tiny_tokenizer_dir / "tokenizer.json").read_text()
    other.write_text(text.replace('"<unk>"', '"<unknown>"', 1))
    expect_error(
        [str(trained), str(tiny_packed["test"]), "--tokenizer", str(other)],
        capsys,
        "other.json",
        "does not match",
    )


def test_evaluate_names_a_split_packed_with_another_tokenizer(trained, tiny_packed, tmp_path, capsys):
    """Another dataset's split: the message says whose tokenizer it is and what to evaluate instead,
    not to delete a good split."""
    import shutil

    for name in ("test.bin", "test.meta.json"):
        shutil.copy(tiny_packed["test"].with_name(name), tmp_path / name)
    meta = json.loads((tmp_path / "test.meta.json").read_text())
    meta["tokenizer_sha256"] = "0" * 64
    (tmp_path / "test.meta.json").write_text(json.dumps(meta))
    assert run_main(["evaluate", str(trained), str(tmp_path / "test.bin"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"test.bin: packed with tokenizer sha256 {'0' * 64}, but " in err, err
    assert "evaluate a split packed with the model's tokenizer, or its stories as a .txt" in err, err
    assert "delete" not in err, err


@pytest.mark.parametrize("damage", ["a flipped byte", "cut short", "no meta file"])
def test_evaluate_names_a_damaged_packed_split_with_advice_for_its_user(trained, tiny_packed, tmp_path, capsys, damage):
    """A damaged split of the right size (a flipped byte) gave slightly other numbers without a word; the
    split evaluated is read whole anyway, so its sha256 is checked against the one packing recorded.
    `tinylm evaluate` reads the user's own files: its messages gave the workflow's advice (delete it and
    rerun, pack_tokens rebuilds it and the runs made from it are retrained), which a .bin packed by hand
    or elsewhere cannot follow. They name the file and say how to make it again, or what to evaluate instead."""
    import shutil

    for name in ("test.bin", "test.meta.json"):
        shutil.copy(tiny_packed["test"].with_name(name), tmp_path / name)
    data = bytearray((tmp_path / "test.bin").read_bytes())
    if damage == "a flipped byte":
        data[10] ^= 1  # a token id still in the vocabulary
    elif damage == "cut short":
        del data[-100:]
    else:
        (tmp_path / "test.meta.json").unlink()
    (tmp_path / "test.bin").write_bytes(bytes(data))
    assert run_main(["evaluate", str(trained), str(tmp_path / "test.bin"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    what = {"a flipped byte": "changed since it was packed (sha256 ", "cut short": "the file is truncated or stale",
            "no meta file": "its meta file test.meta.json is missing"}[damage]
    assert err.startswith(f"error: {tmp_path / 'test.bin'}: ") and what in err, err
    assert ("make it again as it was made (the workflow's pack_tokens rule, or tinylm.data.pack_split), or evaluate "
            "the stories it was packed from") in err, err
    assert "rerun" not in err and "retrained" not in err and "delete" not in err.lower(), err


def test_evaluate_refuses_a_model_smaller_than_the_tokenizer(
    tiny_packed, tiny_tokenizer_dir, tiny_train_model, tmp_path, capsys
):
    tok = tiny_tokenizer_dir / "tokenizer.json"
    small = save(
        tmp_path / "small.pt",
        GPT(GPTConfig(**tiny_train_model(vocab_size=300))),
        tok,
        sha256_file(tok),
    )
    expect_error(
        [str(small), str(tiny_packed["test"])], capsys, "small.pt", "vocab_size 300", "512"
    )


# -- workflow scripts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script", sorted((LIB.parent / "workflow_scripts").glob("*.py")), ids=lambda p: p.name
)
def test_every_workflow_script_option_has_help(script):
    tree = ast.parse(script.read_text(encoding="utf-8"))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_argument"
    ]
    silent = [ast.unparse(c.args[0]) for c in calls if "help" not in {k.arg for k in c.keywords}]
    assert not silent, f"{script.name}: options without help=: {', '.join(silent)}"


def test_check_config_names_the_line_of_a_yaml_mistake_in_a_configfile(tmp_path, capsys):
    # Snakemake reads a --configfile before the workflow and says only "not valid JSON or YAML".
    bad = tmp_path / "my.yaml"
    bad.write_text("train:\n  lr: [1\n  batch_size: 3\n")
    assert run_main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}, line 3, column 13" in err and "fix the YAML there" in err


def test_check_config_names_a_config_file_that_is_not_utf8(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("results_dir: artifacts/caf\u00e9\n".encode("latin-1"))
    assert run_main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: not UTF-8 text") and "Traceback" not in err


def test_check_config_applies_the_workflow_checks_to_the_merged_files(tmp_path, capsys):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("results_dir: artifacts/mine\nmodels:\n  condor: {d_model: 64, n_layers: 1, n_heads: 2, "
                     "d_ff: 128, max_seq_len: 128, ffn: dense}\n")
    second.write_text("train:\n  lrr: 0.01\n")
    assert run_main(["check-config", str(first), str(second)]) == 1
    assert "unknown key 'lrr' in train (did you mean 'lr'?)" in capsys.readouterr().err

    second.write_text("models:\n  condor: {d_model: 64, n_layers: 1, n_heads: 2, d_ff: 128, max_seq_len: 128, "
                      "ffn: dense, seeds: [1, 2]}\n")  # a later file's entry replaces the earlier one's keys
    assert run_main(["check-config", str(first), str(second)]) == 0
    out = capsys.readouterr().out
    # models merge key by key over config/config.yaml's, as Snakemake merges them
    assert out.strip() == "config ok: 4 runs under artifacts/mine/runs: baseline, falcon, condor-seed1, condor-seed2"


def test_check_config_warns_of_a_sweep_point_that_trains_a_models_run_again(tmp_path, capsys):
    # snakemake warns of it before running; check-config, which lists the runs, must too
    mine = tmp_path / "a.yaml"
    mine.write_text("models:\n  condor: {seeds: [1]}\n"
                    "sweeps:\n  lr:\n    model: condor\n    grid: {train.lr: [3.0e-4, 1.0e-3]}\n    seeds: [1]\n")
    assert run_main(["check-config", str(mine)]) == 0
    out, err = capsys.readouterr()
    assert "config ok: 5 runs" in out
    assert ("warning: run condor-lr0.0003-seed1 has the model, settings and seed of run condor-seed1 and trains "
            "the same model again") in err


def test_check_config_refuses_a_file_that_is_not_a_mapping_or_is_missing(tmp_path, capsys):
    listed = tmp_path / "list.yaml"
    listed.write_text("- lr: 1\n")
    assert run_main(["check-config", str(listed)]) == 1
    assert f"{listed} holds a list, not a mapping of settings" in capsys.readouterr().err
    assert run_main(["check-config", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml: no such file" in capsys.readouterr().err
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")  # Snakemake: "Config file must be given as JSON or YAML with keys at top level"
    assert run_main(["check-config", str(empty)]) == 1
    assert f"{empty} holds nothing, not a mapping of settings" in capsys.readouterr().err


def test_check_config_refuses_a_target_among_the_files_as_the_workflow_does(capsys, monkeypatch):
    # snakemake's command line with its target after --configfile, checked first: the workflow refuses the
    # target as a config file it makes; check-config listed every key of metrics.json as unknown instead
    from tinylm.check_config import CHECKOUT

    monkeypatch.chdir(CHECKOUT)
    assert run_main(["check-config", "--configfile", "config/smoke.yaml", "artifacts/smoke/runs/condor/metrics.json"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: --configfile artifacts/smoke/runs/condor/metrics.json is a file this workflow makes, not a config; "
        "Snakemake reads every path after --configfile as a config file: put targets before it (snakemake --cores 4 "
        "artifacts/smoke/runs/condor/metrics.json --configfile my.yaml)")


def test_check_config_merges_the_files_together_then_over_the_defaults_as_snakemake_does(tmp_path, capsys):
    # The first file sets models to null, the second gives it one entry: Snakemake merges the files
    # into each other first, so the defaults' models survive beside it (merged file by file over the
    # defaults, the null would have dropped them).
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("models: null\n")
    second.write_text("models: {condor: {seeds: [1, 2]}}\n")
    assert run_main(["check-config", str(first), str(second)]) == 0
    assert capsys.readouterr().out.strip() == "config ok: 4 runs under artifacts/runs: baseline, falcon, condor-seed1, condor-seed2"


def test_check_config_checks_the_local_story_files_a_config_names(tmp_path, capsys):
    # as the workflow does before any job: an unset, missing or shared file is a config mistake
    cfg = tmp_path / "local.yaml"
    cfg.write_text("dataset: {source: local, name: mine}\n")
    assert run_main(["check-config", str(cfg)]) == 1
    assert "dataset.local.train" in capsys.readouterr().err
    cfg.write_text(f"dataset: {{source: local, name: mine, local: {{train: {tmp_path}/no.txt, "
                   f"validation: {tmp_path}/no.txt}}}}\n")
    assert run_main(["check-config", str(cfg)]) == 1
    assert "no.txt" in capsys.readouterr().err
    (tmp_path / "train.txt").write_text("Once upon a time a cat sat.\n\nA dog ran far away.\n")
    (tmp_path / "val.txt").write_text("The sun was warm and bright.\n")
    cfg.write_text(f"dataset: {{source: local, name: mine, local: {{train: {tmp_path}/train.txt, "
                   f"validation: {tmp_path}/val.txt}}}}\n")
    assert run_main(["check-config", str(cfg)]) == 1  # too small to fill one row of 129 tokens
    err = capsys.readouterr().err
    assert "val.txt: the dataset.local.validation file holds 29 bytes, so its validation split would hold at most " \
           "31 tokens, fewer than one packed row of packing.seq_len + 1 = 129" in err, err
    assert "train.txt: the dataset.local.train file holds 49 bytes" in err and "lower packing.seq_len (128)" in err
    cfg.write_text(cfg.read_text() + "packing: {seq_len: 16}\n")
    assert run_main(["check-config", str(cfg)]) == 0
    assert capsys.readouterr().out.startswith("config ok: 3 runs")


def test_evaluate_stories_under_another_field_name_it_and_read_it_with_text_column(
    trained, tiny_raw, tmp_path, capsys
):
    """A .jsonl or .parquet whose stories are under another name is refused naming the option that
    reads it (not dataset.text_column, a config key evaluate has no use for), and --text-column reads it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tinylm.data import read_stories

    stories = list(read_stories(tiny_raw[0] / "validation.txt"))
    lines, table = tmp_path / "stories.jsonl", tmp_path / "stories.parquet"
    lines.write_text("".join(json.dumps({"story": story}) + "\n" for story in stories))
    pq.write_table(pa.table({"story": stories}), table)
    want = evaluate_json([str(trained), str(tiny_raw[0] / "validation.txt")], capsys)
    for path in (lines, table):
        assert run_main(["evaluate", str(trained), str(path), "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert "error: " in err and "no 'text'" in err and "set --text-column to the" in err, err
        assert "dataset.text_column" not in err, err
        got = evaluate_json([str(trained), str(path), "--text-column", "story"], capsys)
        for key in ("loss", "tokens", "bytes"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (path, key)


def test_evaluate_a_text_file_names_seq_len_as_the_option(trained, tiny_raw, tmp_path, capsys):
    """The rows of a .txt are the --seq-len option's: too long for the model is refused before
    packing, naming the option; too few tokens for one row names it too (not packing.seq_len)."""
    text = tiny_raw[0] / "validation.txt"
    expect_error([str(trained), str(text), "--seq-len", "1000"], capsys,
                 "--seq-len = 1000 is more than the 32 positions the model trained on")
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a dog.\n")
    assert run_main(["evaluate", str(trained), str(short), "--seq-len", "30", "--device", "cpu"]) == 1
    err = capsys.readouterr().err  # after the packing's progress line
    assert "error: " in err and "short.txt: 13 tokens make no complete row of --seq-len + 1 = 31" in err


def test_check_config_names_the_file_a_bad_setting_comes_from(tmp_path, capsys):
    good, typo = tmp_path / "good.yaml", tmp_path / "typo.yaml"
    good.write_text("results_dir: artifacts/mine\n")
    typo.write_text("train: {max_step: 100}\n")
    assert run_main(["check-config", str(good), str(typo)]) == 1
    err = capsys.readouterr().err
    assert f"error: {typo}, line 1: unknown key 'max_step' in train (did you mean 'max_steps'?)" in err


@pytest.mark.parametrize(("text", "line", "message"), [
    ("results_dir: artifacts/mine\ntrain:\n  lr: 0.001\n  beta1: 1.0\n", 4, "train.beta1 = 1.0 must be < 1"),
    ("models:\n  condor:\n    d_model: 64\n    n_head: 2\n", 4, "unknown key 'n_head' in models.condor"),
    ("models:\n  tiny:\n    d_model: 64\n", 2, "models.tiny: 'n_layers', 'n_heads', 'd_ff' are required properties"),
    ("models:\n  condor:\n    seeds: [1, -2]\n", 3, "models.condor.seeds[1] = -2 must be >= 0"),
    ("sweeps:\n  lr:\n    model: condor\n    grid:\n      train.lr: [0.001]\n      train.lrr: [1]\n", 6,
     "sweeps.lr.grid: unknown key 'train.lrr'"),
    ("train:\n  lr: 0.001\nresults_dir: data/mine\n", 3, "results_dir = 'data/mine': name a folder of its own"),
])
def test_check_config_names_the_line_of_a_setting_the_schema_refuses(tmp_path, capsys, text, line, message):
    """A refused setting in a config file is named with its file and line, as a YAML mistake is."""
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(text)
    assert run_main(["check-config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"error: {cfg}, line {line}: {message}" in err, err


def test_check_config_names_every_setting_the_schema_refuses_at_once(tmp_path, capsys):
    """Two typos and two values out of bounds: all four named in one go, not one per attempt; the file
    and line are the first's."""
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("train:\n  lrr: 0.001\n  max_step: 100\n  device: gpu\n  precision: fp8\n")
    assert run_main(["check-config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert (f"error: {cfg}, line 2: 4 settings refused (config/schema.yaml describes each key and its allowed "
            "values):\n") in err, err
    for problem in ("unknown key 'lrr' in train (did you mean 'lr'?)",
                    "unknown key 'max_step' in train (did you mean 'max_steps'?)",
                    "train.device = 'gpu' must be one of auto, cuda, cpu",
                    "train.precision = 'fp8' must be one of bf16, fp16, fp32"):
        assert f"\n  {problem}" in err, err


def test_a_script_stopped_with_ctrl_c_ends_with_a_line_not_a_traceback():
    """Ctrl-C in a workflow job (evaluation, packing) printed a KeyboardInterrupt traceback. Now one
    line, and the process still ends by SIGINT, so a shell loop around the command stops too."""
    import signal
    import subprocess
    import sys

    script = ("import argparse\nfrom tinylm.cli import run_script\n"
              "def main(args):\n    raise KeyboardInterrupt\n"
              "run_script(main, argparse.ArgumentParser(), [])\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGINT
    assert r.stderr.startswith("interrupted") and "Traceback" not in r.stderr


@pytest.mark.parametrize(("error", "line"), [
    ("OSError(errno.EROFS, 'Read-only file system', '/results/runs/x/metrics.json')",
     "error: /results/runs/x/metrics.json: Read-only file system; a folder this job writes to cannot be "
     "written: make it writable (or give results_dir a writable place), then run again"),
    ("OSError(errno.EROFS, 'Read-only file system', '/results/runs/x/.tinylm-tmp.123.metrics.json.ab_d1234.tmp')",
     "error: /results/runs/x/metrics.json: Read-only file system; a folder this job writes to cannot be "
     "written: make it writable (or give results_dir a writable place), then run again"),
    ("PermissionError(errno.EACCES, 'Permission denied', '/data/raw/x/train.txt')",
     "error: /data/raw/x/train.txt: Permission denied; a folder this job writes to cannot be written "
     "or a file it reads cannot be read: make it accessible to this user, then run again"),
])
def test_a_file_the_system_refuses_ends_a_script_with_a_line_naming_it(error, line):
    """A read-only results folder ended evaluation and the data jobs in an OSError traceback: the
    environment's refusal, not a bug. One line naming the file, exit status 1."""
    import subprocess
    import sys

    script = ("import argparse, errno\nfrom tinylm.cli import run_script\n"
              f"def main(args):\n    raise {error}\n"
              "run_script(main, argparse.ArgumentParser(), [])\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == line, r.stderr


def test_an_os_error_without_a_file_keeps_its_traceback():
    import subprocess
    import sys

    script = ("import argparse, errno\nfrom tinylm.cli import run_script\n"
              "def main(args):\n    raise OSError(errno.EIO, 'Input/output error')\n"
              "run_script(main, argparse.ArgumentParser(), [])\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_check_config_blames_no_file_for_a_mistake_in_the_base(tmp_path, capsys):
    from tinylm.check_config import DEFAULTS

    base, good = tmp_path / "base.yaml", tmp_path / "good.yaml"
    base.write_text(DEFAULTS.read_text().replace("results_dir: artifacts", "results_dir: data/x", 1))
    good.write_text("train: {max_steps: 100}\n")
    assert run_main(["check-config", "--base", str(base), str(good)]) == 1
    err = capsys.readouterr().err
    assert "results_dir" in err and "good.yaml" not in err


def test_check_config_reads_relative_story_paths_from_the_checkout_as_the_workflow_does(tmp_path, monkeypatch, capsys):
    import tinylm.check_config

    checkout, elsewhere = tmp_path / "checkout", tmp_path / "elsewhere"
    (checkout / "stories").mkdir(parents=True)
    elsewhere.mkdir()
    (checkout / "stories" / "train.txt").write_text("Once upon a time a cat sat.\n\nA dog ran far away.\n")
    (checkout / "stories" / "val.txt").write_text("The sun was warm and bright.\n")
    cfg = tmp_path / "local.yaml"
    cfg.write_text("dataset: {source: local, name: mine, local: {train: stories/train.txt, validation: stories/val.txt}}\n"
                   "packing: {seq_len: 16}\n")  # rows these short stories can fill
    monkeypatch.setattr(tinylm.check_config, "CHECKOUT", checkout)  # the workflow's directory
    monkeypatch.chdir(elsewhere)  # check-config run from another one
    assert run_main(["check-config", str(cfg)]) == 0, capsys.readouterr().err


def test_check_config_takes_files_after_configfile_as_snakemake_does(tmp_path, capsys):
    # `tinylm check-config --configfile my.yaml`, the snakemake spelling, was "unrecognized arguments"
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("train: {max_steps: 100}\n")
    two.write_text("train: {lr: -1}\n")
    assert run_main(["check-config", "--configfile", str(one)]) == 0, capsys.readouterr().err
    assert run_main(["check-config", "--configfile", str(one), str(two)]) == 1
    assert "two.yaml" in capsys.readouterr().err


def test_check_config_checks_the_progress_interval_training_reads_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("TINYLM_PROGRESS_SEC", "-1")
    assert run_main(["check-config"]) == 1
    assert "TINYLM_PROGRESS_SEC = '-1': give the seconds between progress lines" in capsys.readouterr().err
    monkeypatch.setenv("TINYLM_PROGRESS_SEC", "30")
    assert run_main(["check-config"]) == 0



@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_progress_interval_is_the_default(monkeypatch, value):
    # `export TINYLM_PROGRESS_SEC=` (meant to clear it) made Snakemake refuse to start
    from tinylm.config import PROGRESS_SEC, progress_interval

    monkeypatch.setenv("TINYLM_PROGRESS_SEC", value)
    assert progress_interval() == PROGRESS_SEC


def test_settings_refused_in_two_files_name_the_first_ones_file_and_line(tmp_path, capsys):
    """Each file alone gives one of the two problems, so neither gives the whole message: the file and
    line named are the first problem's. A value that breaks two rules (a type, and an enum) is one line,
    and YAML's null is called null."""
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("train:\n  lr: 0.001\n  beta1: 1.0\n")
    two.write_text("models:\n  condor:\n    n_head: 2\n")
    assert run_main(["check-config", str(one), str(two)]) == 1
    err = capsys.readouterr().err
    assert f"error: {one}, line 3: 2 settings refused" in err, err
    assert "\n  train.beta1 = 1.0 must be < 1\n  unknown key 'n_head' in models.condor" in err, err
    one.write_text("train:\n  device: null\n  batch_size: -1.5\n")
    assert run_main(["check-config", str(one)]) == 1
    err = capsys.readouterr().err
    assert f"error: {one}, line 2: 2 settings refused" in err, err
    assert "\n  train.device: null is not of type 'string'\n  train.batch_size: -1.5 is not of type 'integer'" in err
    assert "None" not in err and err.count("train.device") == 1, err


def test_numbers_as_keys_beside_names_are_refused_with_a_message(tmp_path, capsys):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("sweeps:\n  1: {grid: {lr: [1]}}\n  s: {grid: {lr: [1]}}\n")
    assert run_main(["check-config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "sweeps" in err, err


@pytest.mark.parametrize("argv", [["check-config", "config/smoke.yaml"], ["verify", "--help"]])
def test_a_reader_that_has_gone_ends_the_command_quietly(argv):
    """`tinylm ... | head -1`: once the reader has gone, the command stops without a BrokenPipeError
    traceback (generate did; the other commands did not)."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        out = subprocess.run([sys.executable, "-m", "tinylm", *argv], stdout=write, stderr=subprocess.PIPE,
                             text=True, cwd=LIB.parent, env={**os.environ, "PYTHONPATH": str(LIB)}, timeout=120)
    finally:
        os.close(write)
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("entry", [["-m", "tinylm", "generate"], ["-m", "tinylm.generate"]],
                         ids=["tinylm generate", "python -m tinylm.generate"])
def test_a_command_stopped_with_ctrl_c_ends_with_a_line_not_a_traceback(trained, entry):
    """Ctrl-C while `tinylm generate` streamed printed a KeyboardInterrupt traceback through torch's
    frames, as every tinylm command did. Now one line, and the process ends by SIGINT as the workflow's
    scripts do (test above)."""
    import signal

    cmd = [sys.executable, *entry, str(trained), "--device", "cpu", "--max-new-tokens", "2000",
           "--temperature", "2.0", *["--prompt", "Once upon a time"] * 200]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline(), "no output before Ctrl-C"  # the first prompt is streaming
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGINT, err
    assert err.startswith("interrupted") and "Traceback" not in err, err


@pytest.mark.parametrize("entry", [["-m", "tinylm", "bench"], ["-m", "tinylm.bench"]],
                         ids=["tinylm bench", "python -m tinylm.bench"])
def test_the_benchmark_stopped_with_ctrl_c_ends_by_sigint(entry):
    """Ctrl-C once the benchmark had timed a step printed its line, then exited with status 1, not by
    SIGINT (130 in a shell) as the other commands do: measuring imports torch._dynamo, whose exit handler
    imports tabulate, whose namedtuples run exec() on a string, and that made Python forget the uncaught
    KeyboardInterrupt. Here it comes while the benchmark evaluates, after its first training figure."""
    import signal

    cmd = [sys.executable, *entry, "--models", "condor", "--batch-sizes", "1", "--steps", "1", "--warmup", "0",
           "--seq-len", "8", "--eval-rows", "1000000", "--eval-batch", "1", "--modes", "eager", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=LIB.parent)
    try:
        while (line := proc.stdout.readline()) and not line.startswith("train "):
            pass
        assert line, "the benchmark ended before its first figure"
        proc.send_signal(signal.SIGINT)  # in the evaluation pass: a million rows, one at a time
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGINT, err
    assert err.startswith("interrupted (Ctrl-C)") and "Traceback" not in err, err


def test_ctrl_c_while_a_command_loads_torch_ends_with_a_line_not_a_traceback():
    """`tinylm generate` spends its first second or two importing torch: Ctrl-C there (a wrong
    argument seen at once) still printed a KeyboardInterrupt traceback through torch's frames, the
    command's import being outside the handler. The interrupt here comes from that import."""
    import signal

    script = ("import importlib\nfrom tinylm import __main__ as cmd\n"
              "def importing(name):\n    raise KeyboardInterrupt\n"
              "importlib.import_module = importing\ncmd.main(['generate', 'x.pt'])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == -signal.SIGINT, r.stderr
    assert r.stderr.startswith("interrupted") and "Traceback" not in r.stderr, r.stderr


# On PYTHONPATH as sitecustomize, so it runs before any entry point's code: the first import of the
# module TRIP (its top-level package) gets a real SIGINT, as a Ctrl-C while it loads would.
CTRL_C_WHILE_IMPORTING = """
import os, signal, sys

class Trip:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == os.environ.get("TRIP"):
            del os.environ["TRIP"]
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Trip())
"""


@pytest.mark.parametrize(("argv", "trip"), [
    (["-m", "tinylm.generate", "x.pt"], "torch"),
    (["-m", "tinylm.bench"], "torch"),
    (["-m", "tinylm", "generate", "x.pt"], "torch"),
    ([str(LIB.parent / "workflow_scripts" / "evaluate_model.py"), "--name", "x", "--checkpoint", "x.pt",
      "--tokenizer", "t.json", "--val-bin", "v.bin", "--test-bin", "t.bin", "--out", "m.json", "--params", "{}"],
     "torch"),
], ids=["python -m tinylm.generate", "python -m tinylm.bench", "tinylm generate", "workflow script"])
def test_ctrl_c_while_an_entry_point_imports_its_libraries_ends_with_a_line(tmp_path, argv, trip):
    """`python -m tinylm.generate` and `python -m tinylm.bench` import torch at the top, before their
    Ctrl-C handler at the bottom: a Ctrl-C in those first seconds printed a KeyboardInterrupt traceback,
    where `tinylm generate` and the workflow's scripts print one line. They now end alike there, by
    SIGINT (status 130 in a shell). (`python -m tinylm.data.bench` is left out: Python imports the
    package tinylm.data, numpy and yaml with it, before any line of the module runs.)"""
    import signal

    (tmp_path / "sitecustomize.py").write_text(CTRL_C_WHILE_IMPORTING)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "TRIP": trip}
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, env=env,
                       cwd=tmp_path)
    assert r.returncode == -signal.SIGINT, r.stderr
    assert r.stderr.startswith("interrupted (Ctrl-C)") and "Traceback" not in r.stderr, r.stderr


def test_generate_refuses_a_tokenizer_without_bos_or_eos_before_writing_anything(tiny_train_model, tmp_path, capsys):
    """A model whose tokenizer has no <bos> (or <eos>) cannot be prompted; that was said only after the
    first prompt had been echoed to the output."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["Once upon a time there was a cat."] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>"]))
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    ckpt = save(tmp_path / "best_model.pt", GPT(GPTConfig(**tiny_train_model())), tok_path, sha256_file(tok_path))
    assert run_main(["generate", str(ckpt), "--prompt", "Once upon a time", "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    assert out == "", out
    assert f"error: {tok_path}: the tokenizer has no <bos> or <eos> token" in err, err


def test_check_config_refuses_a_section_given_twice_in_one_file(tmp_path, capsys):
    # YAML keeps the second `train:` and drops the first's settings without a word; Snakemake reads it so too
    cfg = tmp_path / "my.yaml"
    cfg.write_text("train:\n  lr: 1.0e-2\nresults_dir: artifacts/mine\ntrain:\n  max_steps: 7\n")
    assert run_main(["check-config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cfg}, line 4: key 'train' is given twice (also at line 1)"), err
    assert "Traceback" not in err


def test_check_config_refuses_story_files_without_source_local_naming_the_line(tmp_path, capsys):
    # README's "Your own stories" config with its `source: local` line forgotten: the hub's data would be used
    cfg = tmp_path / "my.yaml"
    cfg.write_text("dataset:\n  local:\n    train: /data/train.txt\n    validation: /data/val.txt\n"
                   "  name: mystories\nresults_dir: artifacts/mystories\n")
    assert run_main(["check-config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cfg}, line 3: dataset.local.train = '/data/train.txt' is set, but "
                          "dataset.source is hub"), err
