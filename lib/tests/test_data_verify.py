"""verify_artifacts re-hashes what the meta files record and lists every problem at once."""

import hashlib
import json
import shutil

import pytest

from tinylm.errors import DataError
from tinylm.verify import verify_artifacts


@pytest.fixture
def roots(tiny_raw, tiny_tokenizer_dir, tiny_packed, tmp_path):
    shutil.copytree(tiny_raw[0], tmp_path / "data" / "raw" / "tiny")
    shutil.copytree(tiny_tokenizer_dir, tmp_path / "artifacts" / "tokenizers" / "tiny")
    shutil.copytree(tiny_packed["train"].parent, tmp_path / "data" / "processed" / "tiny")
    return tmp_path / "data", tmp_path / "artifacts"


def test_every_recorded_file_is_verified(roots):
    paths = verify_artifacts(roots)
    names = sorted(p.rsplit("/", 1)[1] for p in paths)
    assert names == sorted(["train.txt", "validation.txt", "test.txt", "train_indices.npy", "test_indices.npy",
                            "tokenizer.json", "train.bin", "validation.bin", "test.bin"])  # fmt: skip


def test_temp_files_of_killed_writers_are_named_and_a_live_ones_are_not(roots, caplog):
    """A job killed mid-write leaves its temporary file; a later write of the same output removes it,
    but one never written again (a dataset dropped from the config) stayed unreported, a checkpoint's
    size at times."""
    import os
    import subprocess
    import sys

    from tinylm.io import TMP_PREFIX

    data, _ = roots
    folder = data / "processed" / "tiny"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid whose process has ended
    dead = folder / f"{TMP_PREFIX}{gone}.train.bin.abcd_123.tmp"
    live = folder / f"{TMP_PREFIX}{os.getppid()}.validation.bin.abcd_123.tmp"  # the pytest runner's parent lives
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    verify_artifacts(roots)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(dead) in m and "left by a killed writer" in m and "delete" in m for m in warned), warned
    assert not any(str(live) in m for m in warned), warned


def test_each_folder_is_listed_once(tree, monkeypatch):
    """verify walked each root twice, once for the records and once for killed writers' temporary files:
    every folder below the roots is listed exactly once (counted at os.scandir, which walks list with)."""
    import os
    from collections import Counter

    roots, expected = tree
    folders = Counter(str(p) for root in roots for p in [root, *root.rglob("*")] if p.is_dir())
    listed = Counter()
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": listed.update([os.fspath(path)]) or scandir(path))
    verify_artifacts(roots, expected)
    assert listed == folders


def test_a_flipped_byte_and_a_missing_file_are_both_reported(roots):
    data, _ = roots
    bin_path = data / "processed" / "tiny" / "train.bin"
    raw = bytearray(bin_path.read_bytes())
    raw[1000] ^= 0x01
    bin_path.write_bytes(raw)
    (data / "raw" / "tiny" / "test.txt").unlink()
    with pytest.raises(DataError, match="2 problem") as err:
        verify_artifacts(roots)
    msg = str(err.value)
    assert f"{bin_path}: sha256" in msg and "train.meta.json records" in msg
    assert "test.txt: missing (recorded in" in msg


def test_a_changed_size_is_reported(roots):
    data, _ = roots
    with open(data / "raw" / "tiny" / "validation.txt", "a") as f:
        f.write("one more story\n")
    with pytest.raises(DataError, match=r"validation\.txt: \d+ bytes, .*meta\.json records \d+"):
        verify_artifacts(roots)


def rebuilt(path, meta_path, text: str) -> None:
    """Write `text` to `path` and record it in `meta_path`, as a rule rebuilding it does."""
    path.write_text(text)
    meta = json.loads(meta_path.read_text())
    meta["files"][path.name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
    meta_path.write_text(json.dumps(meta))


def test_outputs_of_data_rebuilt_since_are_out_of_date(roots):
    """Every file intact as recorded, but the stories rebuilt after the tokenizer was trained on them, and
    the tokenizer retrained after a run used it: both are reported, naming the record and the input."""
    data, artifacts = roots
    raw, tok = data / "raw" / "tiny", artifacts / "tokenizers" / "tiny"
    tok_meta = json.loads((tok / "tokenizer_meta.json").read_text())
    tok_meta["train_text"]["path"] = str(raw / "train.txt")  # this tree's stories, not the fixture's
    (tok / "tokenizer_meta.json").write_text(json.dumps(tok_meta))
    run = artifacts / "runs" / "condor"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"tokenizer_path": str(tok / "tokenizer.json"),
                                                 "tokenizer_sha256": tok_meta["tokenizer_sha256"]}))
    verify_artifacts(roots)

    rebuilt(raw / "train.txt", raw / "meta.json", "Other stories.\n<|endoftext|>\nAnd more.\n")
    with pytest.raises(DataError, match="1 problem") as err:
        verify_artifacts(roots)
    assert f"{tok / 'tokenizer_meta.json'}: made from {raw / 'train.txt'} (sha256 " in str(err.value)
    assert "which has changed since" in str(err.value) and "run snakemake again" in str(err.value)

    rebuilt(tok / "tokenizer.json", tok / "tokenizer_meta.json", '{"model": "retrained"}')  # on the new stories:
    tok_meta = json.loads((tok / "tokenizer_meta.json").read_text())
    tok_meta["train_text"]["sha256"] = hashlib.sha256((raw / "train.txt").read_bytes()).hexdigest()
    (tok / "tokenizer_meta.json").write_text(json.dumps(tok_meta))
    with pytest.raises(DataError, match="1 problem") as err:
        verify_artifacts(roots)
    assert f"{run / 'config.json'}: made from {tok / 'tokenizer.json'}" in str(err.value)


def test_a_run_made_from_a_split_repacked_since_is_out_of_date(roots):
    """The tokenizer unchanged, the validation split repacked (another seq_len, or other validation
    stories): the runs' records name the splits they read, with the sha256 their meta recorded."""
    from tinylm.data.pack import made_from_record

    data, artifacts = roots
    proc = data / "processed" / "tiny"
    run = artifacts / "runs" / "condor"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"made_from": made_from_record(proc / "validation.bin")}))
    assert made_from_record(proc / "validation.bin")[0]["sha256"] == hashlib.sha256(
        (proc / "validation.bin").read_bytes()).hexdigest()
    verify_artifacts(roots)
    rebuilt(proc / "validation.bin", proc / "validation.meta.json", "other rows")
    with pytest.raises(DataError, match="1 problem") as err:
        verify_artifacts(roots)
    assert f"{run / 'metrics.json'}: made from {proc / 'validation.bin'}" in str(err.value)


# -- every artifact the config implies ---------------------------------------------------------------

HISTORY = [
    {"kind": "train", "step": 10, "loss": 5.0},
    {"kind": "eval", "step": 10, "val_loss": 5.1},
    {"kind": "train", "step": 20, "loss": 4.0},
    {"kind": "resume", "step": 20},
    {"kind": "train", "step": 30, "loss": 3.5},
    {"kind": "eval", "step": 30, "val_loss": 3.9},
    {"kind": "done", "final_step": 30, "best_step": 30},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def tree(roots):
    """roots plus one finished run; returns (roots, the paths a config with that run implies)."""
    data, artifacts = roots
    run = artifacts / "runs" / "m"
    (run / "checkpoints").mkdir(parents=True)
    best = run / "checkpoints" / "best_model.pt"
    best.write_bytes(b"weights" * 100)
    (run / "config.json").write_text("{}")
    write_jsonl(run / "metrics.jsonl", HISTORY)
    record = {"sha256": hashlib.sha256(best.read_bytes()).hexdigest(), "bytes": best.stat().st_size}
    (run / "metrics.json").write_text(json.dumps({"files": {"checkpoints/best_model.pt": record}}))
    expected = [
        data / "raw" / "tiny" / f for f in ("train.txt", "validation.txt", "test.txt", "meta.json")
    ]
    expected += [
        artifacts / "tokenizers" / "tiny" / f for f in ("tokenizer.json", "tokenizer_meta.json")
    ]
    for split in ("train", "validation", "test"):
        expected += [
            data / "processed" / "tiny" / f"{split}{ext}" for ext in (".bin", ".meta.json")
        ]
    expected += [
        run / f
        for f in ("checkpoints/best_model.pt", "config.json", "metrics.jsonl", "metrics.json")
    ]
    return roots, expected


def test_a_good_tree_passes_with_every_expected_file(tree):
    roots, expected = tree
    paths = verify_artifacts(roots, expected=expected)
    assert set(map(str, expected)) <= set(paths)


def test_a_file_two_records_name_is_verified_and_listed_once(tree, caplog):
    # config.json records best_model.pt too (RunFiles.save_best): one file, one "ok" line.
    roots, expected = tree
    run = roots[1] / "runs" / "m"
    (run / "config.json").write_text((run / "metrics.json").read_text())
    with caplog.at_level("INFO", logger="tinylm.verify"):
        paths = verify_artifacts(roots, expected=expected)
    best = str(run / "checkpoints" / "best_model.pt")
    assert paths.count(best) == 1 and len(paths) == len(set(paths))
    assert [r.getMessage() for r in caplog.records].count(f"ok {best}") == 1


def test_a_deleted_meta_is_an_error_when_the_config_implies_it(tree):
    roots, expected = tree
    data, _ = roots
    meta = data / "processed" / "tiny" / "validation.meta.json"
    meta.unlink()
    (data / "processed" / "tiny" / "validation.bin").write_bytes(b"\0" * 64)  # unrecorded now
    with pytest.raises(DataError, match="1 problem") as err:
        verify_artifacts(roots, expected=expected)
    assert f"{meta}: missing" in str(err.value)


def test_a_missing_expected_file_without_a_record_is_an_error(tree):
    roots, expected = tree
    config = roots[1] / "runs" / "m" / "config.json"
    config.unlink()
    with pytest.raises(DataError, match=f"{config}: missing") as err:
        verify_artifacts(roots, expected=expected)
    # most often a verify run with another config than the one that built the results
    assert "a file the config verify ran with makes. To check another config's results, give its " \
           "--configfile" in str(err.value)


@pytest.mark.parametrize(
    "rows, problem",
    [
        (
            [*HISTORY[:2], HISTORY[2], HISTORY[0], *HISTORY[4:]],
            r"train row at step 10 after step 20",
        ),
        ([*HISTORY[:-1], HISTORY[1], HISTORY[-1]], r"eval row at step 10 after step 30"),
        ([*HISTORY, HISTORY[-1]], r"2 'done' rows"),
        (HISTORY[:-1], r"no 'done' row"),
        (
            [*HISTORY[:2], HISTORY[-1], *HISTORY[2:-1]],
            r"the 'done' row is line 3 of 7, not the last",
        ),
        (
            [HISTORY[0], {"kind": "resume", "step": 5}, *HISTORY[4:]],
            r"resume row at step 5 after step 10",
        ),
    ],
    ids=[
        "train-out-of-order",
        "eval-out-of-order",
        "two-done",
        "no-done",
        "done-not-last",
        "resume-back",
    ],
)
def test_a_bad_history_is_reported(tree, rows, problem):
    roots, expected = tree
    history = roots[1] / "runs" / "m" / "metrics.jsonl"
    write_jsonl(history, rows)
    for kwargs in (
        {"expected": expected},
        {},
    ):  # also without a config: every metrics.jsonl below roots
        with pytest.raises(DataError, match=f"{history}: {problem}"):
            verify_artifacts(roots, **kwargs)


def test_interleaved_writers_and_a_torn_line_are_reported(tree):
    roots, _ = tree
    history = roots[1] / "runs" / "m" / "metrics.jsonl"
    two = [HISTORY[0], HISTORY[0], HISTORY[2], HISTORY[2]]
    write_jsonl(history, [*two, HISTORY[-1]])
    with pytest.raises(DataError, match=r"train row at step 10 after step 10"):
        verify_artifacts(roots)
    rows = [{"kind": "train", "step": s} for s in range(10, 110, 10)]
    write_jsonl(
        history, [r for pair in zip(rows, rows, strict=True) for r in pair] + HISTORY[-1:] * 2
    )
    with pytest.raises(DataError, match="^5 problem") as err:  # not one line per row
        verify_artifacts(roots)
    assert str(err.value).endswith(f"{history}: 7 more problem(s) like these")
    history.write_text(
        json.dumps(HISTORY[0]) + "\n" + '{"kind": "tra\n' + json.dumps(HISTORY[-1]) + "\n"
    )
    with pytest.raises(DataError, match=rf"{history}: line 2 is not valid JSON"):
        verify_artifacts(roots)


def test_files_of_an_interrupted_run_are_missing_with_the_way_to_resume(tree):
    """After Ctrl-C in training, verify listed best_model.pt and metrics.json as missing, advising to delete
    files ('snakemake reruns the rule once the file is deleted'): there was nothing to delete, and the
    last.pt a rerun resumes from went unmentioned."""
    roots, expected = tree
    run = roots[1] / "runs" / "m"
    (run / "checkpoints" / "best_model.pt").unlink()
    (run / "metrics.json").unlink()
    (run / "checkpoints" / "last.pt").write_bytes(b"state")
    with pytest.raises(DataError) as err:
        verify_artifacts(roots, expected=expected)
    text = str(err.value)
    for name in ("checkpoints/best_model.pt", "metrics.json"):
        assert (f"{run / name}: missing (the config implies it); its run stopped before the end: snakemake "
                f"resumes it from {run / 'checkpoints' / 'last.pt'}") in text, text
    assert "run snakemake to build what is missing" in text, text


@pytest.mark.parametrize("name", ["raw/tiny/test.txt", "processed/tiny/test.bin"])
def test_a_missing_data_file_says_how_to_make_it_again(tree, name):
    """Snakemake remakes a missing data file only for a job that reads it: with the runs built, plain
    `snakemake` (what the message advised for every missing file) found nothing to do and left it missing.
    The message names the command that makes it: the file asked for by path."""
    roots, expected = tree
    lost = roots[0] / name
    lost.unlink()
    with pytest.raises(DataError) as err:
        verify_artifacts(roots, expected=expected)
    text = str(err.value)
    assert (f"{lost}: missing (the config implies it); snakemake makes a data file again only for a job that "
            f"reads it: ask for it by path (snakemake --cores 1 {lost}, with the same --configfile)") in text, text
    run_file = roots[1] / "runs" / "m" / "config.json"  # a run's file: the default target remakes it
    run_file.unlink()
    with pytest.raises(DataError) as err:
        verify_artifacts(roots, expected=expected)
    assert f"{run_file}: missing (the config implies it)\n" in str(err.value) + "\n"


def test_a_run_still_training_is_named_as_such(tree):
    from tinylm.runlock import RunLock

    roots, expected = tree
    history = roots[1] / "runs" / "m" / "metrics.jsonl"
    write_jsonl(history, HISTORY[:-1])
    with RunLock(history.parent), pytest.raises(DataError, match=r"no 'done' row: its training is still "
                                                                 r"running \(pid \d+ on .*\); verify again once"):
        verify_artifacts(roots, expected=expected)


def test_data_made_for_another_dataset_and_copied_in_is_reported(tree):
    """A tokenizer copied from another dataset's folder agrees with its own records (the same stories,
    even): with the config's dataset folder given, verify names it, as the workflow refuses it."""
    (data, artifacts), expected = tree
    raw = data / "raw" / "tiny"
    metas = [artifacts / "tokenizers" / "tiny" / "tokenizer_meta.json",
             *(data / "processed" / "tiny" / f"{split}.meta.json" for split in ("train", "validation", "test"))]
    for meta_path in metas:  # made here, from this tree's stories
        meta = json.loads(meta_path.read_text())
        key = "train_text" if "train_text" in meta else "text"
        meta[key]["path"] = str(raw / f"{meta_path.name.split('.')[0].replace('tokenizer_meta', 'train')}.txt")
        meta_path.write_text(json.dumps(meta))
    verify_artifacts((data, artifacts), expected=expected, raw_dir=raw)

    other = data / "raw" / "other"
    shutil.copytree(raw, other)
    meta = json.loads(metas[0].read_text())
    meta["train_text"]["path"] = str(other / "train.txt")  # trained there, then copied here
    metas[0].write_text(json.dumps(meta))
    verify_artifacts((data, artifacts), expected=expected)  # without the folder: nothing to compare
    with pytest.raises(DataError, match="1 problem") as err:
        verify_artifacts((data, artifacts), expected=expected, raw_dir=raw)
    assert (f"{metas[0]}: trained on {other / 'train.txt'}, but this config's dataset reads {raw / 'train.txt'}: "
            "it was made for another dataset and copied in; delete it and rerun") in str(err.value)


def test_a_split_packed_from_another_split_of_the_same_dataset_is_reported(tree):
    """verify judges a record's text as the workflow does: the exact file of this split, not any file of
    the dataset's folder. A validation split whose meta says it was packed from train.txt is refused by
    the workflow (workflow.check_inputs), so verify names it too."""
    (data, artifacts), expected = tree
    raw = data / "raw" / "tiny"
    metas = {name: artifacts / "tokenizers" / "tiny" / "tokenizer_meta.json" if name == "tokenizer"
             else data / "processed" / "tiny" / f"{name}.meta.json" for name in ("tokenizer", "train", "validation", "test")}
    tok = json.loads(metas["tokenizer"].read_text())
    tok["train_text"]["path"] = str(raw / "train.txt")  # made here, from this tree's stories
    metas["tokenizer"].write_text(json.dumps(tok))
    for split in ("train", "test"):
        meta = json.loads(metas[split].read_text())
        meta["text"]["path"] = str(raw / f"{split}.txt")
        metas[split].write_text(json.dumps(meta))
    train = json.loads(metas["train"].read_text())
    validation = json.loads(metas["validation"].read_text())
    validation["text"] = train["text"]  # packed from train.txt, which is as it was then
    metas["validation"].write_text(json.dumps(validation))
    verify_artifacts((data, artifacts), expected=expected)  # its records agree with the files
    with pytest.raises(DataError, match="1 problem") as err:
        verify_artifacts((data, artifacts), expected=expected, raw_dir=raw)
    validation_meta = data / "processed" / "tiny" / "validation.meta.json"
    assert (f"{validation_meta}: packed from {raw / 'train.txt'}, but this config's dataset reads "
            f"{raw / 'validation.txt'} for it: it was made from another file of this dataset") in str(err.value)


def test_inputs_recorded_from_another_folder_are_named_and_missing_roots_refused(roots, tmp_path, monkeypatch,
                                                                                   caplog):
    """Records name their inputs as the workflow saw them, relative to the folder it ran in. Run from
    elsewhere, verify found none of them and passed a changed input without a word; and a root that
    does not exist verified nothing and passed."""
    data, artifacts = roots
    raw, tok = data / "raw" / "tiny", artifacts / "tokenizers" / "tiny"
    tok_meta = json.loads((tok / "tokenizer_meta.json").read_text())
    tok_meta["train_text"]["path"] = "data/raw/tiny/train.txt"  # as the workflow records it
    (tok / "tokenizer_meta.json").write_text(json.dumps(tok_meta))
    monkeypatch.chdir(tmp_path)
    verify_artifacts(roots)
    rebuilt(raw / "train.txt", raw / "meta.json", "Other stories.\n<|endoftext|>\nAnd more.\n")
    with pytest.raises(DataError, match="has changed since"):
        verify_artifacts(roots)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    caplog.clear()
    verify_artifacts(roots)  # what it cannot find, it cannot compare: said, not passed over
    assert any("data/raw/tiny/train.txt" in r.getMessage() and "not found from" in r.getMessage()
               for r in caplog.records), caplog.text
    with pytest.raises(DataError, match=r"nowhere: no such folder"):
        verify_artifacts([tmp_path / "nowhere"])


def test_a_folder_named_on_the_command_line_that_does_not_exist_is_refused(roots, tmp_path, monkeypatch, capsys):
    # `tinylm verify data artifcts` said "verified N file(s) below data, artifcts", nothing checked in the second
    from tinylm.verify import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "artifcts"])
    assert exit_info.value.code == 1
    assert "artifcts: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "artifacts"])
    assert exit_info.value.code == 0


def test_a_folder_without_any_record_is_refused_not_verified(tmp_path, monkeypatch, capsys):
    # `tinylm verify config` printed "verified 0 file(s) below config" and exited 0: nothing was checked
    from tinylm.verify import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("results_dir: artifacts\n")
    (tmp_path / "config" / "notes.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main(["config"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert ("config: no record tinylm writes below it (meta files, runs' metrics.jsonl), so nothing to verify; "
            "name the folders the workflow wrote (data, artifacts)") in err, err


def test_nothing_built_yet_is_one_line_naming_the_command_that_builds_it(tree, capsys):
    """`snakemake verify` on a fresh checkout listed every file the config implies as missing, a dozen long
    lines, each saying to ask for it by path: nothing is built, so one line says so and what to run."""
    from tinylm.verify import main

    roots, expected = tree
    shutil.rmtree(roots[0])
    shutil.rmtree(roots[1])
    with pytest.raises(DataError) as err:
        verify_artifacts(roots, expected=expected, build_command="snakemake --cores 4 --configfile config/demo.yaml")
    text = str(err.value)
    assert "\n" not in text, text
    assert text.startswith(f"nothing this config makes is built yet (none of the {len(expected)} files it implies"), text
    assert "run the workflow first: snakemake --cores 4 --configfile config/demo.yaml" in text, text
    with pytest.raises(DataError, match=r"^nothing this config makes is built yet.*: snakemake --cores 4 \(with "
                                        r"the config's --configfile, if it has one\), then verify again$"):
        verify_artifacts(roots, expected=expected)
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, roots), "--expected", *map(str, expected), "--build-command", "snakemake --cores 4"])
    assert exit_info.value.code == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "run the workflow first: snakemake --cores 4, then" in err_lines[0], err_lines


def test_a_fresh_checkout_says_nothing_is_built_yet(tmp_path, monkeypatch, capsys):
    """`tinylm verify` in a checkout where the workflow never ran (no data/, no artifacts/) said to run it
    "in the folder the workflow ran in": it is that folder, and nothing is built yet."""
    from tinylm.verify import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("results_dir: artifacts\n")
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing is built here yet (no record tinylm writes below data, artifacts)" \
        in err, err
    assert "run the workflow first: snakemake --cores 4" in err, err
    (tmp_path / "artifacts" / "logs").mkdir(parents=True)  # a first run that failed, or `snakemake verify`
    (tmp_path / "artifacts" / "config-owner.json").write_text('{"config": "config/config.yaml"}')
    with pytest.raises(SystemExit):
        main([])
    assert "nothing is built here yet" in capsys.readouterr().err
