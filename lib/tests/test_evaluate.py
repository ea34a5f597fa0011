"""Evaluation numbers on hand-checkable cases, and checkpoint save/load."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinylm.checkpoint import (
    check_compatible,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from tinylm.errors import CheckpointError, DataError
from tinylm.evaluate import GraphedLoss, evaluate_loss
from tinylm.model import GPT, GPTConfig


class Uniform(torch.nn.Module):
    """Stub: equal logits for every token, so the loss must be ln(vocab)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x, y):
        logits = torch.zeros(*x.shape, self.vocab)
        return {"logits": logits, "ce_loss": F.cross_entropy(logits.flatten(0, 1), y.flatten())}


def test_uniform_model_has_loss_ln_vocab_and_hand_computed_bpb():
    vocab = 50
    rows = np.random.default_rng(0).integers(
        0, vocab, size=(7, 9)
    )  # 7 rows: batches of 3 pad the last
    byte_lengths = np.arange(vocab) % 4  # tokens decode to 0..3 bytes
    out = evaluate_loss(Uniform(vocab), rows, batch_size=3, byte_lengths=byte_lengths)
    assert out["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert out["tokens"] == 7 * 8
    n_bytes = byte_lengths[rows[:, 1:]].sum()
    assert out["bytes"] == n_bytes
    assert out["bpb"] == pytest.approx(7 * 8 * math.log(vocab) / math.log(2) / n_bytes, rel=1e-6)
    assert out["ppl"] == pytest.approx(vocab, rel=1e-5)


def test_no_rows_is_refused_not_scored_perfect():
    # zero rows gave loss 0.0 and perplexity 1.0, a perfect score for nothing evaluated
    with pytest.raises(ValueError, match="no rows to evaluate"):
        evaluate_loss(Uniform(50), np.zeros((0, 9), dtype=np.int64), byte_lengths=np.ones(50))


@pytest.mark.parametrize("rows", [np.zeros((0, 9), dtype=np.int64), np.full((2, 9), 50, dtype=np.int64)])
def test_a_failed_evaluation_leaves_a_training_model_training(rows):
    # no rows (refused) or a token id beyond the vocabulary (the embedding raises): the caller that
    # catches it goes on training a model in eval mode, with dropout off, unless the mode is restored
    model = GPT(GPTConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8, dropout=0.1))
    model.train()
    with pytest.raises((ValueError, IndexError)):
        evaluate_loss(model, rows, batch_size=2)
    assert model.training


def test_evaluate_matches_a_direct_computation(tiny_config):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**tiny_config(vocab_size=64)))
    rows = torch.randint(0, 64, (5, 13))
    out = evaluate_loss(model, rows.numpy(), batch_size=2)
    with torch.no_grad():
        logits = model(rows[:, :-1])["logits"]
        want = F.cross_entropy(logits.reshape(-1, 64), rows[:, 1:].reshape(-1)).item()
    assert out["loss"] == pytest.approx(want, rel=1e-5)


def test_graphed_loss_off_cuda_is_the_plain_model(tiny_config):
    """GraphedLoss records CUDA graphs only on CUDA (lib/tests/test_cuda.py checks that path); on the
    CPU it hands each batch to the model, and evaluate_loss still switches the model to eval and back."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**tiny_config(vocab_size=64)))
    rows = torch.randint(0, 64, (5, 13))
    want = evaluate_loss(model, rows.numpy(), batch_size=2)
    graphed = GraphedLoss(model)
    assert graphed.training
    got = evaluate_loss(graphed, rows.numpy(), batch_size=2)
    assert got == want and graphed.graph is None and model.training
    assert graphed.eval() is graphed and not model.training and not graphed.training


def test_checkpoint_round_trip_and_compatibility(tmp_path, tiny_config):
    cfg = GPTConfig(**tiny_config(vocab_size=64))
    model = GPT(cfg)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(
        path,
        {
            "model_config": cfg.to_dict(),
            "model": model.state_dict(),
            "tokenizer_sha256": "abc",
            "step": 7,
            "optimizer": None,
            "extra": {"best_val_loss": 1.5},
        },
    )
    loaded, ckpt = model_from_checkpoint(path)
    assert ckpt["step"] == 7 and ckpt["extra"]["best_val_loss"] == 1.5
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    check_compatible(ckpt, path, model_config=cfg.to_dict(), tokenizer_sha256="abc")
    with pytest.raises(
        CheckpointError, match=r"ckpt\.pt: made with a different model config \(d_model"
    ):
        check_compatible(ckpt, path, model_config={**cfg.to_dict(), "d_model": 2 * cfg.d_model})
    with pytest.raises(CheckpointError, match="tokenizer sha256 abc"):
        check_compatible(ckpt, path, tokenizer_sha256="def")
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_checkpoint_from_before_fp32_residual_existed(tmp_path, tiny_config):
    # Models saved before the key existed ran with an fp32 residual stream: they load that way, and a
    # resume under today's default (a bf16 stream on CUDA) names the key and the setting that matches.
    cfg = GPTConfig(**tiny_config(vocab_size=64))
    old = {k: v for k, v in cfg.to_dict().items() if k != "fp32_residual"}
    path = tmp_path / "old.pt"
    save_checkpoint(path, {"model_config": old, "model": GPT(cfg).state_dict(), "tokenizer_sha256": "abc",
                           "step": 1, "optimizer": None})
    loaded, ckpt = model_from_checkpoint(path)
    assert loaded.config.fp32_residual is True
    check_compatible(ckpt, path, model_config={**cfg.to_dict(), "fp32_residual": True})
    with pytest.raises(CheckpointError, match="fp32_residual: checkpoint True vs now False"):
        check_compatible(ckpt, path, model_config=cfg.to_dict())


def test_an_moe_checkpoint_from_before_fused_moe_blocks_loads_as_it_ran(tmp_path, tiny_config):
    # Until 2026-12-06 MoE blocks ran both residual adds as plain layers on an fp32 stream. A checkpoint
    # saved without the key that records this loads that way, and a resume under today's default names
    # the key and the setting that matches. Dense blocks never read it: a dense checkpoint without it
    # loads with today's value and resumes under today's config.
    for ffn, as_saved in (("moe", False), ("dense", True)):
        cfg = GPTConfig(**tiny_config(vocab_size=64, ffn=ffn, n_experts=4, top_k=2))
        old = {k: v for k, v in cfg.to_dict().items() if k != "moe_fused_blocks"}
        path = tmp_path / f"{ffn}.pt"
        save_checkpoint(path, {"model_config": old, "model": GPT(cfg).state_dict(), "tokenizer_sha256": "abc",
                               "step": 1, "optimizer": None, "seq_len": cfg.max_seq_len})
        loaded, ckpt = model_from_checkpoint(path)
        assert loaded.config.moe_fused_blocks is as_saved
        check_compatible(ckpt, path, model_config={**cfg.to_dict(), "moe_fused_blocks": as_saved})
        if ffn == "moe":
            with pytest.raises(CheckpointError, match="moe_fused_blocks: checkpoint False vs now True"):
                check_compatible(ckpt, path, model_config=cfg.to_dict())


def test_a_top1_moe_checkpoint_from_before_the_probability_gate_is_refused(tmp_path, tiny_config):
    """Until 2026-12-05 a top_k 1 MoE gated every token by 1; now by the router probability. Weights
    trained the old way would silently compute another function: such a checkpoint (one without the
    "seq_len" key, which checkpoints gained in the same change) is refused, naming what to do. Newer
    ones, and older ones of other models, load."""
    cfg = GPTConfig(**tiny_config(vocab_size=64, ffn="moe", n_experts=4, top_k=1))
    state = {"model_config": cfg.to_dict(), "model": GPT(cfg).state_dict(), "tokenizer_sha256": "abc",
             "step": 1, "optimizer": None}
    save_checkpoint(tmp_path / "old.pt", state)
    with pytest.raises(CheckpointError, match=r"old\.pt: .*top_k 1.*before 2026-12-05.*Retrain it"):
        load_checkpoint(tmp_path / "old.pt")
    save_checkpoint(tmp_path / "new.pt", {**state, "seq_len": 16})
    assert model_from_checkpoint(tmp_path / "new.pt")[0].config.top_k == 1
    top2 = GPTConfig(**tiny_config(vocab_size=64, ffn="moe", n_experts=4, top_k=2))
    save_checkpoint(tmp_path / "top2.pt", {**state, "model_config": top2.to_dict(), "model": GPT(top2).state_dict()})
    assert model_from_checkpoint(tmp_path / "top2.pt")[0].config.top_k == 2


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable tinylm checkpoint") as e:
        load_checkpoint(tmp_path / "junk.pt")
    # a wrong path (README.md for the checkpoint) is as likely as a damaged one: say both, in that order
    assert str(e.value).endswith("check the path; if it is a checkpoint training wrote, it is damaged: delete "
                                 "it and retrain")
    (tmp_path / "text.pt").write_text('{"a": 1}')  # unpickling fails, but not for unsafe objects
    with pytest.raises(CheckpointError, match=r"text\.pt: not a readable tinylm checkpoint \(UnpicklingError") as e:
        load_checkpoint(tmp_path / "text.pt")
    assert "Python objects" not in str(e.value)
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a tinylm checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_checkpoints_load_with_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"format": "tinylm-checkpoint-v1", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable") as refused:
        load_checkpoint(tmp_path / "evil.pt")
    # the message says why, and does not pass on torch's advice to load it unsafely
    assert "Python objects that a weights-only load refuses" in str(refused.value)
    assert "weights_only set to False" not in str(refused.value) and "\n" not in str(refused.value)


def test_evaluation_checks_the_tokenizer_against_the_checkpoint(tmp_path, tiny_config, tiny_tokenizer_dir, tiny_packed):
    from tinylm.evaluate import evaluate_run
    from tinylm.io import sha256_file

    tokenizer = tiny_tokenizer_dir / "tokenizer.json"
    cfg = GPTConfig(**tiny_config(vocab_size=512, max_seq_len=32))
    ckpt = tmp_path / "best_model.pt"
    save_checkpoint(ckpt, {"model_config": cfg.to_dict(), "model": GPT(cfg).state_dict(), "step": 1,
                           "tokenizer_sha256": sha256_file(tokenizer), "optimizer": None})
    run = dict(model_name="m", checkpoint=ckpt, val_bin=tiny_packed["validation"], test_bin=tiny_packed["test"],
               device="cpu", max_new_tokens=2, prompts=["The"])
    metrics = evaluate_run(tokenizer_path=tokenizer, out_json=tmp_path / "metrics.json", **run)
    assert metrics["tokenizer_sha256"] == sha256_file(tokenizer)
    other = tmp_path / "other" / "tokenizer.json"
    other.parent.mkdir()
    other.write_text(tokenizer.read_text().replace('"<unk>"', '"<UNK>"'))
    with pytest.raises(CheckpointError, match=r"other/tokenizer\.json: .*best_model\.pt"):
        evaluate_run(tokenizer_path=other, out_json=tmp_path / "metrics2.json", **run)
    assert not (tmp_path / "metrics2.json").exists()


def test_evaluation_refuses_a_packed_split_whose_bytes_changed_since_packing(tmp_path, tiny_config, tiny_tokenizer_dir,
                                                                            tiny_packed):
    """The workflow hashes a split only where it is newer than its meta file; one damaged in place with
    its time kept (or copied so) was evaluated as it was. The evaluation reads both splits whole, so it
    hashes them too, before the model runs, and writes no metrics.json. The job's message gives the
    workflow's advice (`tinylm evaluate` gives its own: test_cli)."""
    import shutil

    from tinylm.evaluate import evaluate_run
    from tinylm.io import sha256_file

    tokenizer = tiny_tokenizer_dir / "tokenizer.json"
    cfg = GPTConfig(**tiny_config(vocab_size=512, max_seq_len=32))
    ckpt = tmp_path / "best_model.pt"
    save_checkpoint(ckpt, {"model_config": cfg.to_dict(), "model": GPT(cfg).state_dict(), "step": 1,
                           "tokenizer_sha256": sha256_file(tokenizer), "optimizer": None})
    for name in ("validation.bin", "validation.meta.json"):
        shutil.copy2(tiny_packed["validation"].with_name(name), tmp_path / name)
    val = tmp_path / "validation.bin"
    data = bytearray(val.read_bytes())
    data[-3] ^= 1
    stat = val.stat()
    val.write_bytes(bytes(data))
    os.utime(val, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as old as before: no newer than its meta
    with pytest.raises(DataError, match=rf"{re.escape(str(val))}: changed since pack_tokens recorded it .*: the tokens "
                                        r"are damaged or were replaced\. Delete it and rerun: pack_tokens rebuilds it"):
        evaluate_run(model_name="m", checkpoint=ckpt, tokenizer_path=tokenizer, val_bin=val,
                     test_bin=tiny_packed["test"], out_json=tmp_path / "metrics.json", device="cpu",
                     max_new_tokens=2, prompts=["The"])
    assert not (tmp_path / "metrics.json").exists()


def test_evaluation_samples_read_only_the_positions_the_model_trained_on(tmp_path, tiny_config, tiny_tokenizer_dir,
                                                                         tiny_packed, monkeypatch):
    """metrics.json's samples come from a model trained on rows of packing.seq_len tokens: generation
    slides over that many positions, not max_seq_len (whose positions past seq_len never trained)."""
    from tinylm.evaluate import evaluate_run
    from tinylm.io import sha256_file

    tokenizer = tiny_tokenizer_dir / "tokenizer.json"
    cfg = GPTConfig(**tiny_config(vocab_size=512, max_seq_len=64))
    ckpt = tmp_path / "best_model.pt"
    torch.manual_seed(0)  # a model whose greedy sample runs past 32 tokens without <eos>
    save_checkpoint(ckpt, {"model_config": cfg.to_dict(), "model": GPT(cfg).state_dict(), "step": 1, "seq_len": 32,
                           "tokenizer_sha256": sha256_file(tokenizer), "optimizer": None})
    seen, decode = [0], GPT.decode

    def recording(self, idx, cache=None):
        seen[0] = max(seen[0], (cache.pos if cache is not None else 0) + idx.shape[1])
        return decode(self, idx, cache)

    monkeypatch.setattr(GPT, "decode", recording)
    evaluate_run(model_name="m", checkpoint=ckpt, tokenizer_path=tokenizer, val_bin=tiny_packed["validation"],
                 test_bin=tiny_packed["test"], out_json=tmp_path / "metrics.json", device="cpu", max_new_tokens=50,
                 temperature=0.0, prompts=["The"])
    assert seen[0] == 32


def test_a_changed_best_checkpoint_is_refused_however_its_path_is_written(tmp_path, tiny_config, monkeypatch):
    """The run's config.json records best_model.pt's sha256. The check looked for config.json two
    folders above the path as written, so `best_model.pt` given from inside checkpoints/ loaded a
    replaced file without a word; and a recorded checkpoint that was deleted gave a FileNotFoundError
    traceback instead of 'not found'."""
    import json
    import os

    from tinylm.errors import TinyLMError
    from tinylm.io import sha256_file

    cfg = GPTConfig(**tiny_config(vocab_size=64))
    best = tmp_path / "run" / "checkpoints" / "best_model.pt"
    best.parent.mkdir(parents=True)

    def save(seed):
        torch.manual_seed(seed)
        save_checkpoint(best, {"model_config": cfg.to_dict(), "model": GPT(cfg).state_dict(),
                               "tokenizer_sha256": "abc", "step": 7, "optimizer": None})

    save(0)
    files = {"checkpoints/best_model.pt": {"sha256": sha256_file(best)}}
    (tmp_path / "run" / "config.json").write_text(json.dumps({"files": files}))
    save(1)  # replaced since
    monkeypatch.chdir(best.parent)
    for written in (best, "best_model.pt", "./best_model.pt", "../checkpoints/best_model.pt"):
        with pytest.raises(CheckpointError, match="changed since"):
            model_from_checkpoint(written)
    os.remove(best)
    with pytest.raises(TinyLMError, match="not found"):
        model_from_checkpoint("best_model.pt")
