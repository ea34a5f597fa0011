"""The data workflow scripts as Snakemake calls them: outputs on success, `error: ...` and exit 1 on bad input."""

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "workflow_scripts" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_download_tokenize_pack_verify_chain(tmp_path):
    dataset = {"name": "demo", "source": "synthetic", "hub_id": "roneneldan/TinyStories", "text_column": "text",
               "local": {"train": None, "validation": None},
               "synthetic": {"n_train": 300, "n_validation": 40, "seed": 3},
               "seed": 42, "test_n": 30, "train_n": None, "validation_n": None}  # fmt: skip
    raw, tok, proc = (
        tmp_path / "data/raw/demo",
        tmp_path / "artifacts/tokenizers/t",
        tmp_path / "data/processed/t",
    )
    r = run("download_tinystories.py", "--out-dir", raw, "--params", json.dumps(dataset))
    assert r.returncode == 0, r.stderr
    tok_params = {
        "vocab_size": 400,
        "special_tokens": ["<pad>", "<bos>", "<eos>", "<unk>"],
        "min_frequency": 2,
    }
    r = run(
        "train_tokenizer.py",
        "--text",
        raw / "train.txt",
        "--out-dir",
        tok,
        "--params",
        json.dumps(tok_params),
    )
    assert r.returncode == 0, r.stderr
    r = run("pack_tokens.py", "--text", raw / "test.txt", "--tokenizer", tok / "tokenizer.json",
            "--out", proc / "test.bin", "--params", json.dumps({"seq_len": 16, "dtype": "auto", "encode_batch": 64}))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((proc / "test.meta.json").read_text())["n_stories"] == 30
    r = run("verify_artifacts.py", tmp_path / "data", tmp_path / "artifacts")
    assert r.returncode == 0 and "verified 7 file(s)" in r.stdout, r.stderr


def test_a_split_that_packs_into_no_row_names_the_setting_that_sized_it(tmp_path):
    """One story more bytes long than a row passes the download job's check (a row's worth of single-byte
    tokens); byte-pair merges make it fewer tokens, and pack_tokens names what to raise, from the raw
    split's meta.json."""
    from tinylm.data import prepare_raw, train_tokenizer
    from tinylm.data.sources import max_packed_tokens

    raw = tmp_path / "data/raw/few"
    meta = prepare_raw(raw, source="synthetic", synthetic_n_train=200, synthetic_n_validation=1, synthetic_seed=3,
                       seed=42, test_n=20, train_n=None, validation_n=None)  # fmt: skip
    seq_len = max_packed_tokens(meta["splits"]["validation"]) - 1
    train_tokenizer(raw / "train.txt", tmp_path / "tok", vocab_size=400, special_tokens=["<bos>", "<eos>"],
                    min_frequency=2)  # fmt: skip
    r = run("pack_tokens.py", "--text", raw / "validation.txt", "--tokenizer", tmp_path / "tok" / "tokenizer.json",
            "--out", tmp_path / "v.bin", "--params", json.dumps({"seq_len": seq_len, "dtype": "auto", "encode_batch": 8}))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert (f"validation.txt: {{}} tokens make no complete row of packing.seq_len + 1 = {seq_len + 1}; raise "
            "dataset.synthetic.n_validation (1), or lower packing.seq_len\n") in re.sub(r"\d+ tokens", "{} tokens",
                                                                                     r.stderr), r.stderr


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [("pack_tokens.py", ["--text", "x.txt", "--tokenizer", "t.json", "--out", "OUT/x.bin",
                         "--params", '{"seq_len": 0, "dtype": "auto", "encode_batch": 8}'],
      "error: packing.seq_len = 0; it must be an integer >= 1"),
     ("train_tokenizer.py", ["--text", "missing.txt", "--out-dir", "OUT",
                             "--params", '{"vocab_size": 512, "special_tokens": ["<bos>", "<eos>"], "min_frequency": 2}'],
      "error: missing.txt: input file not found")],
)  # fmt: skip
def test_bad_input_prints_one_error_line_and_exits_1(tmp_path, script, args, message):
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    r = subprocess.run([sys.executable, str(ROOT / "workflow_scripts" / script), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture
def hub_without_datasets():
    """A Hugging Face hub endpoint on this machine that answers every request: not found."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(b'{"error": "Repository not found"}')

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_hub_id_the_hub_does_not_know_is_named_with_its_key(tmp_path, hub_without_datasets):
    """A misspelt dataset.hub_id: the hub answers, but has no such dataset."""
    dataset = {"name": "t", "source": "hub", "hub_id": "roneneldan/TinyStorys", "text_column": "text",
               "local": {"train": None, "validation": None}, "synthetic": {},
               "seed": 42, "test_n": 30, "train_n": None, "validation_n": None}  # fmt: skip
    env = {**os.environ, "HF_ENDPOINT": hub_without_datasets, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
    r = subprocess.run([sys.executable, str(ROOT / "workflow_scripts" / "download_tinystories.py"),
                        "--out-dir", str(tmp_path / "raw"), "--params", json.dumps(dataset)],
                       capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert "error: dataset.hub_id = 'roneneldan/TinyStorys'" in r.stderr, r.stderr
    assert not (tmp_path / "raw").exists()


def test_params_that_are_not_a_json_object_are_a_usage_error(tmp_path):
    r = run("pack_tokens.py", "--text", "x", "--tokenizer", "t", "--out", "o", "--params", "[1, 2]")
    assert r.returncode == 2 and "--params must be a JSON object" in r.stderr


def test_a_bad_record_only_is_named_as_itself(tmp_path):
    """train_model.py's second JSON flag was refused as "--params is not valid JSON", naming the other flag."""
    paths = [a for flag in ("--name", "--train-bin", "--val-bin", "--tokenizer", "--best", "--history", "--config",
                            "--run-dir") for a in (flag, str(tmp_path / "x"))]  # fmt: skip
    for record, message in (("{log_every: 5", "--record-only is not valid JSON"), ("[5]", "--record-only must be a JSON object")):
        r = run("train_model.py", *paths, "--params", '{"train": {}}', "--record-only", record)
        assert r.returncode == 2 and message in r.stderr, r.stderr


def test_summarize_names_a_bad_json_flag_as_itself(tmp_path):
    """--sweeps and --moe-plots are read as every script reads a JSON object (cli.parse_params)."""
    paths = [a for flag in ("--runs-csv", "--by-setting-csv", "--comparison-csv", "--table", "--run-settings",
                            "--samples", "--loss-vs-step", "--loss-vs-time") for a in (flag, str(tmp_path / "x"))]  # fmt: skip
    for flag, value, message in (("--sweeps", "[1]", "--sweeps must be a JSON object"),
                                 ("--moe-plots", "{bad", "--moe-plots is not valid JSON")):  # fmt: skip
        r = run("summarize.py", "--runs", "[]", *paths, flag, value)
        assert r.returncode == 2 and message in r.stderr, r.stderr


def test_bench_prints_its_figures(tmp_path, capsys):
    from tinylm.data import bench

    res = bench.main(
        [
            "--stories",
            "300",
            "--vocab-size",
            "400",
            "--seq-len",
            "32",
            "--json",
            str(tmp_path / "b.json"),
        ]
    )
    out = capsys.readouterr().out
    for label in ("tokenizer training", "packing (train)", "total", "MB/s", "peak RSS"):
        assert label in out
    assert json.loads((tmp_path / "b.json").read_text())["stories"] == res["stories"] == 300


def test_bench_json_goes_into_a_folder_not_made_yet(tmp_path):
    """--json as tinylm.bench's: written whole (io.write_json), its folder made, not a FileNotFoundError
    once the benchmark has run."""
    from tinylm.data import bench

    out = tmp_path / "figures" / "b.json"
    res = bench.main(["--stories", "200", "--vocab-size", "300", "--seq-len", "16", "--json", str(out)])
    assert json.loads(out.read_text())["stories"] == res["stories"]


def test_a_full_disk_is_one_error_line_naming_the_file(tmp_path):
    """A disk or quota that fills up mid-write (here: the kernel's per-process file-size limit) ended the
    job in an OSError traceback; it is one `error:` line naming the file and what to do, and nothing
    half-written is left behind."""
    dataset = {"name": "demo", "source": "synthetic", "hub_id": "roneneldan/TinyStories", "text_column": "text",
               "local": {"train": None, "validation": None},
               "synthetic": {"n_train": 3000, "n_validation": 40, "seed": 3},
               "seed": 42, "test_n": 30, "train_n": None, "validation_n": None}  # fmt: skip
    raw = tmp_path / "raw"
    limit = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY)); "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", limit, str(ROOT / "workflow_scripts" / "download_tinystories.py"),
                        "--out-dir", str(raw), "--params", json.dumps(dataset)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: could not write {raw}") and "room" in error, error
    assert not [p for p in raw.rglob("*") if p.is_file()]  # no partial file


@pytest.mark.parametrize("what", ["pack", "tokenizer"])
def test_a_full_disk_names_the_file_that_did_not_fit(what, tmp_path, tiny_raw, tiny_tokenizer_dir):
    """The packed split and its meta file (the tokenizer and its meta) are written together; a disk that
    filled up while the split (the tokenizer) was written was reported as `could not write
    train.meta.json` (or a temporary file of tokenizer_meta.json), a few hundred bytes, not the file
    that did not fit."""
    if what == "pack":
        call = (f"pack_split({str(tiny_raw[0] / 'train.txt')!r}, {str(tiny_tokenizer_dir / 'tokenizer.json')!r}, "
                f"{str(tmp_path / 'train.bin')!r}, seq_len=32, workers=1)")
        limit, culprit = 100_000, tmp_path / "train.bin"
    else:
        call = (f"train_tokenizer({str(tiny_raw[0] / 'train.txt')!r}, {str(tmp_path)!r}, vocab_size=512, "
                f"special_tokens=['<pad>', '<bos>', '<eos>', '<unk>'], min_frequency=2, workers=1)")
        limit, culprit = 10_000, tmp_path / "tokenizer.json"
    script = ("import resource, signal\n"
              "from tinylm.data import pack_split, train_tokenizer\n"
              "from tinylm.errors import OutputError\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))\n"
              f"try:\n    {call}\nexcept OutputError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "lib")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"could not write {culprit}: File too large"), r.stdout
    assert not list(tmp_path.iterdir())  # nothing half-written
