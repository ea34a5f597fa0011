"""Generation: KV cache vs full recompute, sampling controls, eos, and the streaming CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tinylm.checkpoint import save_checkpoint
from tinylm.generate import complete, generate_ids, main, sample_next
from tinylm.io import sha256_file

STORIES = [
    "Once upon a time there was a little girl named Lily.",
    "The boy and his dog went to the park to play with a red ball.",
    "The day is fun and the sun is warm. Tom smiled at his mom.",
    "Once upon a time, a cat found a big box. The cat was happy!",
]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(STORIES * 5, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_path))


@pytest.fixture(scope="module")
def checkpoint(tokenizer_path, tokenizer, tmp_path_factory, tiny_gpt) -> Path:
    model = tiny_gpt(vocab_size=tokenizer.get_vocab_size())
    path = tmp_path_factory.mktemp("run") / "best_model.pt"
    save_checkpoint(
        path,
        {
            "model_config": model.config.to_dict(),
            "model": model.state_dict(),
            "tokenizer_sha256": sha256_file(tokenizer_path),
            "tokenizer_path": str(tokenizer_path),
            "step": 0,
        },
    )
    return path


def ids(model, prompt, n, use_cache=True, eos_id=None, seed=None):
    """Greedy without a seed, else sampled at temperature 1 from a generator seeded with `seed`."""
    kw = (
        {} if seed is None else dict(temperature=1.0, generator=torch.Generator().manual_seed(seed))
    )
    return list(
        generate_ids(model, prompt, max_new_tokens=n, eos_id=eos_id, use_cache=use_cache, **kw)
    )


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_cached_decoding_matches_full_forward(ffn, tiny_gpt):
    # capacity_factor 0.5 would drop assignments in a 12-token call: decoding must not.
    model = tiny_gpt(ffn=ffn, n_experts=4, capacity_factor=0.5)
    idx = torch.randint(0, 97, (2, 12))
    cache = model.new_cache(batch_size=2)
    with torch.no_grad():
        pieces = [model.decode(idx[:, a:b], cache) for a, b in [(0, 5), (5, 6), (6, 7), (7, 12)]]
        full = model.decode(idx)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)
    if ffn == "dense":
        torch.testing.assert_close(full, model(idx)["logits"])


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_cache_changes_nothing_past_the_window(ffn, tiny_gpt):
    model = tiny_gpt(ffn=ffn, n_experts=4, capacity_factor=0.5)
    prompt = [1, 5, 9, 13]
    greedy = ids(model, prompt, 40)  # 44 tokens: the 16-token window slides
    assert len(greedy) == 40 and greedy == ids(model, prompt, 40, use_cache=False)
    # A random model's greedy output soon repeats one token; samples drawn with the same random
    # numbers stay varied and agree only if every step's logits do.
    sampled = ids(model, prompt, 40, seed=0)
    assert len(set(sampled[16:])) > 10 and sampled == ids(model, prompt, 40, False, seed=0)
    long_prompt = list(range(3, 23))  # longer than the window from the start
    assert ids(model, long_prompt, 5) == ids(model, long_prompt, 5, use_cache=False)


def test_seed_makes_sampling_repeatable(tiny_gpt):
    model = tiny_gpt()
    assert ids(model, [1], 20, seed=7) == ids(model, [1], 20, seed=7)
    assert ids(model, [1], 20, seed=7) != ids(model, [1], 20, seed=8)


def test_top_k_and_top_p_restrict_the_choices():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50)
    top3 = set(logits.topk(3).indices.tolist())
    drawn = {sample_next(logits, temperature=2.0, top_k=3, generator=g) for _ in range(200)}
    assert drawn == top3
    logp = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    for top_p, allowed in [(0.7, {0, 1}), (0.9, {0, 1, 2}), (0.4, {0})]:
        drawn = {sample_next(logp, temperature=1.0, top_p=top_p, generator=g) for _ in range(200)}
        assert drawn == allowed, top_p
    assert sample_next(logits, temperature=0.0) == int(logits.argmax())


def test_eos_stops_generation(tiny_gpt):
    model = tiny_gpt()
    seq = ids(model, [1, 2], 12, seed=1)
    k = next(i for i, t in enumerate(seq) if i >= 2 and t not in seq[:i])
    assert ids(model, [1, 2], 12, eos_id=seq[k], seed=1) == seq[:k]


class Recorder:
    """A stdout that remembers each write and whether a flush followed it."""

    def __init__(self):
        self.writes, self.flushed = [], 0

    def write(self, s):
        self.writes.append(s)

    def flush(self):
        self.flushed = len(self.writes)


def test_cli_streams_completions(checkpoint, tokenizer, monkeypatch, tmp_path, tiny_gpt):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The boy and his dog\n\nOnce\n")
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    args = [str(checkpoint), "--prompt", "Once upon a time", "--prompts-file", str(prompts)]
    assert main(args + ["--max-new-tokens", "12", "--temperature", "0"]) == 0
    text = "".join(out.writes)
    model = tiny_gpt(vocab_size=tokenizer.get_vocab_size())
    texts = ["Once upon a time", "The boy and his dog", "Once"]
    done = complete(model, tokenizer, texts, max_new_tokens=12, temperature=0.0)
    assert text == "\n".join(p + c + "\n" for p, c in zip(texts, done, strict=True))
    assert len(out.writes) > 12 and out.flushed == len(out.writes)  # piece by piece, each flushed

    out.writes.clear()
    assert main(args + ["--max-new-tokens", "12", "--temperature", "0", "--no-cache"]) == 0
    assert "".join(out.writes) == text


def test_cli_samples_as_the_config_eval_section_does(checkpoint, tokenizer, monkeypatch, tiny_gpt):
    from tinylm.schema import defaults

    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert main([str(checkpoint), "--prompt", "Once", "--device", "cpu"]) == 0
    cfg = defaults("eval")
    model = tiny_gpt(vocab_size=tokenizer.get_vocab_size())
    (done,) = complete(model, tokenizer, ["Once"], max_new_tokens=cfg["max_new_tokens"],
                       temperature=cfg["temperature"], top_k=cfg["top_k"], seed=cfg["seed"])
    assert "".join(out.writes) == "Once" + done + "\n"


def test_complete_is_seeded_per_prompt(checkpoint, tokenizer, tiny_gpt):
    model = tiny_gpt(vocab_size=tokenizer.get_vocab_size())
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=20, seed=3)
    a, b = complete(model, tokenizer, ["Once", "The"], **kw)
    assert complete(model, tokenizer, ["The"], **kw) == [b]


def test_tokenizer_mismatch_names_both_hashes(checkpoint, tokenizer_path, tmp_path, capsys):
    other = tmp_path / "tokenizer.json"
    other.write_text(tokenizer_path.read_text() + "\n")
    with pytest.raises(SystemExit) as e:
        main([str(checkpoint), "--prompt", "Once", "--tokenizer", str(other)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error:")
    assert sha256_file(other) in err and sha256_file(tokenizer_path) in err


def test_bad_checkpoint_path_is_a_clean_error(tmp_path):
    missing = tmp_path / "nope.pt"
    r = subprocess.run(  # the module entry point, as `python -m tinylm generate` runs it
        [sys.executable, "-m", "tinylm", "generate", str(missing), "--prompt", "Once"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert r.stderr.startswith("error:") and str(missing) in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("damage", ["other weights", "no weights", "no model config"])
def test_a_checkpoint_whose_records_make_no_model_is_named(checkpoint, tiny_gpt, tmp_path, capsys, damage):
    # load_state_dict's RuntimeError, or a KeyError, ended generate and evaluate in a traceback
    from tinylm.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    if damage == "other weights":  # another model's weights under this model's config
        state["model"] = tiny_gpt(vocab_size=state["model_config"]["vocab_size"], d_ff=16).state_dict()
    else:
        del state["model" if damage == "no weights" else "model_config"]
    bad = tmp_path / "best_model.pt"
    save_checkpoint(bad, state)
    with pytest.raises(SystemExit) as e:
        main([str(bad), "--prompt", "Once"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(f"error: {bad}: ") and "retrain" in err, err


def test_cli_names_its_own_options_in_sampling_errors(checkpoint, capsys):
    with pytest.raises(SystemExit):
        main([str(checkpoint), "--prompt", "Once", "--top-k", "-3"])
    err = capsys.readouterr().err
    assert "--top-k = -3 must be >= 0 (0 = all tokens)" in err  # as --help says, not the API's None
    with pytest.raises(SystemExit):
        main([str(checkpoint), "--prompt", "Once", "--temperature", "-1"])
    assert "--temperature = -1.0 must be a finite number >= 0 (0 = greedy)" in capsys.readouterr().err


def positions_read(monkeypatch) -> list[int]:
    """[the largest position GPT.decode reads], over the calls after this one."""
    from tinylm.model import GPT

    seen, decode = [0], GPT.decode

    def recording(self, idx, cache=None):
        seen[0] = max(seen[0], (cache.pos if cache is not None else 0) + idx.shape[1])
        return decode(self, idx, cache)

    monkeypatch.setattr(GPT, "decode", recording)
    return seen


@pytest.mark.parametrize("cache", [[], ["--no-cache"]])
def test_generation_reads_only_the_positions_the_model_trained_on(tokenizer_path, tokenizer, tmp_path, monkeypatch,
                                                                   tiny_gpt, cache):
    """A model trained on rows of 8 tokens (packing.seq_len) with a table of 16 positions (max_seq_len)
    never learned positions 8-15: past 8 tokens the window slides over the last 8, not 16. Reading the
    untrained positions turned long samples into gibberish."""
    model = tiny_gpt(vocab_size=tokenizer.get_vocab_size())
    assert model.config.max_seq_len == 16
    path = tmp_path / "best_model.pt"
    save_checkpoint(path, {"model_config": model.config.to_dict(), "model": model.state_dict(), "step": 0,
                           "tokenizer_sha256": sha256_file(tokenizer_path), "tokenizer_path": str(tokenizer_path),
                           "seq_len": 8})
    seen = positions_read(monkeypatch)
    monkeypatch.setattr(sys, "stdout", Recorder())
    assert main([str(path), "--prompt", "Once upon a time", "--max-new-tokens", "20", "--temperature", "0",
                 *cache]) == 0
    assert seen[0] == 8


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_cli_refuses_a_temperature_that_is_not_a_finite_number(checkpoint, capsys, value):
    with pytest.raises(SystemExit):
        main([str(checkpoint), "--prompt", "Once", f"--temperature={value}"])
    assert f"--temperature = {value} must be a finite number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 1e-9])
def test_a_tiny_positive_temperature_samples_the_most_likely_token(temperature):
    """The option's bound is a finite number >= 0: a tiny one divided the logits into infinities, whose
    softmax was nan, and torch refused to sample (a traceback from `tinylm generate`)."""
    logits = torch.tensor([1.0, 3.0, -2.0, 2.5])
    for top_k, top_p in [(None, None), (2, None), (None, 0.9)]:
        got = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=torch.Generator().manual_seed(0))
        assert got == 1, (top_k, top_p)


def test_a_temperature_below_the_smallest_float_is_greedy():
    """1e-50 passed the sampling check but is 0 in float32: 0 / 0 made the softmax nan."""
    logits = torch.randn(50)
    assert sample_next(logits, temperature=1e-50, generator=torch.Generator().manual_seed(0)) == int(logits.argmax())


def test_a_prompts_file_that_is_a_folder_or_not_utf8_is_named(checkpoint, tmp_path, capsys):
    bad = tmp_path / "latin.txt"
    bad.write_bytes(b"caf\xe9\n")
    for path, said in ((bad, "not UTF-8 text"), (tmp_path, "is a folder")):
        with pytest.raises(SystemExit):
            main([str(checkpoint), "--prompts-file", str(path)])
        err = capsys.readouterr().err
        assert f"--prompts-file {path}: {said}" in err, err


def test_help_shows_the_sampling_defaults(capsys):
    """--help gave no defaults, so --top-p 0.9 alone looked like nucleus sampling, while the default top-k
    of 5 at temperature 0.1 still applied and gave the near-greedy text."""
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--temperature TEMPERATURE 0 = greedy (default: 0.1)", "(0 = all; default: 5)",
                 "--max-new-tokens MAX_NEW_TOKENS tokens to add to each prompt (default: 64)", "(default: 42)",
                 "applied after --top-k"):
        assert text in out, text


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_cli_refuses_a_seed_torch_cannot_take_before_writing_anything(checkpoint, monkeypatch, capsys, seed):
    """--seed 2**64 ended in `error: Overflow when unpacking long long` after the prompt was written (the
    generator is seeded per prompt), naming neither the option nor its range; -1 was quietly the seed
    2**64 - 1. The bounds are eval.seed's (config/schema.yaml)."""
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    with pytest.raises(SystemExit):
        main([str(checkpoint), "--prompt", "Once", "--seed", seed])
    assert f"error: --seed = {seed} must be in [0, 2**64 - 1]" in capsys.readouterr().err
    assert out.writes == []


def test_complete_names_a_seed_torch_cannot_take(checkpoint, tokenizer, tiny_gpt):
    model = tiny_gpt(vocab_size=tokenizer.get_vocab_size())
    with pytest.raises(ValueError, match=r"seed = -5 must be in \[0, 2\*\*64 - 1\] \(or None\)"):
        complete(model, tokenizer, ["Once"], max_new_tokens=2, temperature=1.0, seed=-5)


def test_special_token_text_in_a_prompt_is_text_as_in_the_training_data(tokenizer):
    """Packing reads "<eos>" typed in a story as its characters (data/pack.py), and encode_prompt promises
    no special token but the leading <bos>; a prompt holding "<eos><bos>" still got those two ids, a story
    end and start the model never saw typed text make."""
    from tinylm.generate import encode_prompt

    bos, eos = tokenizer.token_to_id("<bos>"), tokenizer.token_to_id("<eos>")
    prompt = "The end.<eos><bos>Once"
    ids = encode_prompt(tokenizer, prompt)
    assert ids[0] == bos and bos not in ids[1:] and eos not in ids, ids
    assert tokenizer.decode(ids[1:], skip_special_tokens=True) == prompt
    assert tokenizer.encode("<eos>", add_special_tokens=False).ids == [eos]  # the tokenizer is left as it was


def test_a_prompts_file_saved_with_a_byte_order_mark_gives_the_prompt_without_it(checkpoint, tmp_path,
                                                                                  monkeypatch):
    """Windows editors save UTF-8 with a byte order mark: it was read as part of the first prompt,
    written back out and fed to the model as three more bytes before "Once"."""
    bom = tmp_path / "prompts.txt"
    bom.write_bytes(b"\xef\xbb\xbfOnce\r\nThe\r\n")
    outs = []
    for args in (["--prompts-file", str(bom)], ["--prompt", "Once", "--prompt", "The"]):
        out = Recorder()
        monkeypatch.setattr(sys, "stdout", out)
        assert main([str(checkpoint), *args, "--max-new-tokens", "6", "--temperature", "0"]) == 0
        outs.append("".join(out.writes))
    assert outs[0] == outs[1] and outs[0].startswith("Once")


def test_a_checkpoint_used_from_another_folder_finds_the_tokenizer_it_records(tokenizer_path, tiny_gpt, tmp_path,
                                                                             monkeypatch, capsys):
    """The workflow records the tokenizer's path as Snakemake wrote it, relative to the folder it ran in: from
    any other folder `tinylm generate <checkout>/artifacts/runs/<run>/checkpoints/best_model.pt` said
    'artifacts/tokenizers/...: tokenizer not found' of a file that is there. It is looked up from the
    checkpoint's folders up too (its sha256 decides), and where it is nowhere the message says from where."""
    from tinylm.checkpoint import checkpoint_tokenizer

    checkout = tmp_path / "checkout"
    tok = checkout / "artifacts" / "tokenizers" / "d" / "bpe" / "tokenizer.json"
    tok.parent.mkdir(parents=True)
    tok.write_bytes(tokenizer_path.read_bytes())
    model = tiny_gpt(vocab_size=Tokenizer.from_file(str(tok)).get_vocab_size())
    ckpt = checkout / "artifacts" / "runs" / "m" / "checkpoints" / "best_model.pt"
    ckpt.parent.mkdir(parents=True)
    record = {"model_config": model.config.to_dict(), "model": model.state_dict(), "step": 0,
              "tokenizer_sha256": sha256_file(tok), "tokenizer_path": "artifacts/tokenizers/d/bpe/tokenizer.json"}
    save_checkpoint(ckpt, record)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert checkpoint_tokenizer(record, ckpt).resolve() == tok.resolve()
    assert main([str(ckpt), "--prompt", "Once", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("Once")

    tok.unlink()
    with pytest.raises(SystemExit):
        main([str(ckpt), "--prompt", "Once"])
    err = capsys.readouterr().err
    assert err.startswith("error: artifacts/tokenizers/d/bpe/tokenizer.json: tokenizer not found here (the "
                          f"checkpoint {ckpt} records it relative to the folder the workflow ran in) nor in a "
                          "folder above the checkpoint; run the command in the workflow's folder, or pass "
                          "--tokenizer PATH"), err


def test_a_prompts_file_without_a_prompt_is_named(checkpoint, tmp_path, capsys):
    # an empty prompts file said only "no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE",
    # as if no file had been given
    for text in ("", "\n  \n\t\n"):
        empty = tmp_path / "prompts.txt"
        empty.write_text(text)
        with pytest.raises(SystemExit):
            main([str(checkpoint), "--prompts-file", str(empty)])
        err = capsys.readouterr().err
        assert err.startswith(f"error: --prompts-file {empty}: holds no prompt (it is empty, or only blank lines); "
                              "write one prompt a line"), err
