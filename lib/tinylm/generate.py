"""Text generation from a checkpoint and its tokenizer, with a KV cache.

  python -m tinylm generate CKPT --prompt "Once upon a time" [--temperature 0.8 --top-k 50 ...]

Prompts are encoded as <bos> + ids; generation stops at <eos> or after max_new_tokens. With the
cache each new token costs one position. The model reads at most `window` tokens: the length of the
rows it trained on (the checkpoint's seq_len, `checkpoint.trained_length`), since learned positions
past that never trained (max_seq_len may be longer: reading those positions turned long samples into
gibberish). Past the window it slides: learned absolute positions mean cached keys would all change
position, so the cache is rebuilt over the last `window` tokens; from then on every token costs a full
window, as without the cache (simple, and identical to uncached decoding, which always reads the last
`window` tokens).
The CLI's sampling defaults are those of the config's `eval:` section (config/schema.yaml), and its
device that of train.device, so it reproduces the samples in metrics.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

if __name__ == "__main__":  # python -m tinylm.generate: a Ctrl-C while torch loads ends as one later does
    from .cli import ctrl_c_ends_quietly_from_here

    ctrl_c_ends_quietly_from_here()

import torch

from . import schema
from .cli import ctrl_c_ends_quietly
from .devices import resolve_device
from .errors import DataError, TinyLMError


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None, *, cli: bool = False) -> None:
    """The sampling settings' bounds, named as the caller gave them: the API's arguments, or with `cli`
    the command's options (where --top-k 0, not None, means all tokens)."""
    t, k, p = ("--temperature", "--top-k", "--top-p") if cli else ("temperature", "top_k", "top_p")
    if not 0 <= temperature < math.inf:  # nan too
        raise ValueError(f"{t} = {temperature} must be a finite number >= 0 (0 = greedy)")
    least, every = (0, "0 = all tokens") if cli else (1, "or None for all tokens")
    if top_k is not None and top_k < least:
        raise ValueError(f"{k} = {top_k} must be >= {least} ({every})")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"{p} = {top_p} must be in (0, 1]" + ("" if cli else " (or None)"))


def _check_seed(seed: int | None, *, cli: bool = False) -> None:
    """eval.seed's bounds (config/schema.yaml): a torch generator takes at most 2**64 - 1, and takes a
    negative seed as that seed plus 2**64."""
    if seed is not None and not 0 <= seed < 2**64:
        raise ValueError(f"{'--seed' if cli else 'seed'} = {seed} must be in [0, 2**64 - 1]" + ("" if cli else " (or None)"))


def sample_next(
    logits_V: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from last-position logits: greedy at temperature 0, else top-k/top-p sampling.

    Sampling runs on the CPU so a seed gives the same tokens whatever device made the logits.
    """
    logits_V = logits_V.detach().float().cpu()
    if temperature == 0:
        return int(logits_V.argmax())
    # The largest logit first moved to 0, so that a tiny temperature makes the others -inf (greedy), not
    # every logit +-inf (a nan softmax). The same distribution otherwise.
    # A temperature below float32's smallest normal number would be 0 in the division: it is greedy.
    logits_V = (logits_V - logits_V.max()) / max(temperature, torch.finfo(logits_V.dtype).tiny)
    if top_k is not None and top_k < logits_V.numel():
        kth = logits_V.topk(top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        # Nucleus: the fewest most likely tokens whose probability sums to at least top_p.
        sorted_V, order_V = logits_V.sort(descending=True)
        probs_V = sorted_V.softmax(dim=-1)
        before_V = probs_V.cumsum(dim=-1) - probs_V  # mass of the more likely tokens
        sorted_V = sorted_V.masked_fill(before_V >= top_p, float("-inf"))
        logits_V = torch.full_like(logits_V, float("-inf")).scatter(0, order_V, sorted_V)
    return int(torch.multinomial(logits_V.softmax(dim=-1), 1, generator=generator))


def generate_ids(
    model,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    window: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time; stops after max_new_tokens or at eos_id (not yielded).

    Put the model in eval mode first. The prompt must hold at least one id (e.g. <bos>). `window`: the
    most tokens the model reads at once, the length it trained on (`checkpoint.trained_length` of its
    checkpoint); default its max_seq_len.
    """
    _check_sampling(temperature, top_k, top_p)
    seq = list(prompt_ids)
    if not seq:
        raise ValueError("prompt_ids is empty; start it with the <bos> id")
    window = model.config.max_seq_len if window is None else window
    if not 1 <= window <= model.config.max_seq_len:
        raise ValueError(f"window = {window} must be in [1, max_seq_len = {model.config.max_seq_len}]")
    device = next(model.parameters()).device
    cache = model.new_cache(1) if use_cache else None
    cache_start = 0  # seq[cache_start : cache_start + cache.pos] is cached

    @torch.inference_mode()
    def next_logits():
        nonlocal cache_start
        if cache is None:
            return model.decode(torch.tensor([seq[-window:]], device=device))[0, -1]
        new = seq[cache_start + cache.pos :]
        if cache.pos + len(new) > window:  # slide: rebuild the cache over the last `window` tokens
            cache.reset()
            cache_start = max(0, len(seq) - window)
            new = seq[cache_start:]
        return model.decode(torch.tensor([new], device=device), cache)[0, -1]

    for _ in range(max_new_tokens):
        token = sample_next(
            next_logits(), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        if token == eos_id:
            return
        yield token
        seq.append(token)


def special_id(tokenizer, token: str) -> int:
    i = tokenizer.token_to_id(token)
    if i is None:
        raise DataError(
            f"the tokenizer has no {token} token; retrain it with special_tokens holding it"
        )
    return i


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """<bos> + the prompt's ids (no other special tokens): text such as "<eos>" in the prompt is read as
    its characters, as packing reads it in a story (data/pack.py)."""
    bos = special_id(tokenizer, "<bos>")
    before = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        return [bos] + tokenizer.encode(prompt, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = before


def generate_for_prompt(
    model, tokenizer, prompt: str, *, seed: int | None, **kwargs
) -> Iterator[int]:
    """generate_ids for a text prompt: <bos> + its ids, stop at <eos>, a fresh generator per prompt.

    Seeding each prompt afresh makes a prompt's sample depend on nothing but the prompt and the seed.
    """
    _check_seed(seed)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    eos = special_id(tokenizer, "<eos>")
    return generate_ids(
        model, encode_prompt(tokenizer, prompt), eos_id=eos, generator=generator, **kwargs
    )


def stream_text(model, tokenizer, prompt: str, **kwargs) -> Iterator[str]:
    """Yield the completion of `prompt` in pieces, each as soon as it decodes to whole characters."""
    ids, shown = [], ""
    for token in generate_for_prompt(model, tokenizer, prompt, **kwargs):
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across byte-level tokens: wait for the rest
            continue
        if text.startswith(shown):
            yield text[len(shown) :]
            shown = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if text != shown and text.startswith(shown):
        yield text[len(shown) :]


def complete(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = schema.defaults("eval")["seed"],
    use_cache: bool = True,
    window: int | None = None,
) -> list[str]:
    """The completion (without the prompt) of each prompt, each seeded afresh with `seed`; `window` as
    in generate_ids."""
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, window=window)
    return [
        tokenizer.decode(
            list(generate_for_prompt(model, tokenizer, p, seed=seed, use_cache=use_cache, **kw)),
            skip_special_tokens=True,
        )
        for p in prompts
    ]


def load_for_generation(
    checkpoint: str | Path, tokenizer_path: str | Path | None = None, device: str = "cpu"
):
    """(model, tokenizer, window) from a checkpoint: the tokenizer must be the one the model was trained
    with; window is the length it trained on (generate_ids' window)."""
    from tokenizers import Tokenizer

    from .checkpoint import checkpoint_tokenizer, model_from_checkpoint, trained_length

    model, ckpt = model_from_checkpoint(checkpoint, device)
    path = checkpoint_tokenizer(ckpt, checkpoint, tokenizer_path)
    tokenizer = Tokenizer.from_file(str(path))
    # prompts start with <bos> and generation stops at <eos>: say so before any prompt is written
    if missing := [t for t in ("<bos>", "<eos>") if tokenizer.token_to_id(t) is None]:
        raise DataError(f"{path}: the tokenizer has no {' or '.join(missing)} token, so it cannot be prompted; "
                        "retrain it with tokenizer.special_tokens holding <bos> and <eos>")
    return model, tokenizer, trained_length(ckpt)


def _parser() -> argparse.ArgumentParser:
    eval_cfg = schema.defaults("eval")
    p = argparse.ArgumentParser(
        prog="tinylm generate", description="Continue prompts with a trained model, streaming."
    )
    p.add_argument(
        "checkpoint",
        help="a tinylm checkpoint, e.g. artifacts/runs/baseline/checkpoints/best_model.pt",
    )
    p.add_argument("--prompt", action="append", default=[], help="text to continue (repeatable)")
    p.add_argument("--prompts-file", help="a file with one prompt per line (blank lines skipped)")
    # the defaults are the workflow's eval settings (config/schema.yaml), shown so that a sampling flag
    # given alone is read against the others it combines with
    p.add_argument("--max-new-tokens", type=int, default=eval_cfg["max_new_tokens"],
                   help="tokens to add to each prompt (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=eval_cfg["temperature"], help="0 = greedy (default: %(default)s)")
    p.add_argument(
        "--top-k",
        type=int,
        default=eval_cfg["top_k"] or 0,
        help="sample among the k most likely tokens (0 = all; default: %(default)s)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="nucleus sampling: smallest set with this much probability, applied after --top-k (give --top-k 0 "
        "for nucleus sampling alone)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=eval_cfg["seed"],
        help="sampling seed, applied afresh to each prompt (default: %(default)s)",
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer.json (default: the tokenizer_path recorded in the checkpoint)",
    )
    p.add_argument(
        "--device",
        default=schema.defaults("train")["device"],
        help="auto (CUDA if present) | cpu | cuda | cuda:N (default: %(default)s)",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="recompute the whole context for every token"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: 0 when done; bad input prints `error: ...` and raises SystemExit(1), like argparse."""
    args = _parser().parse_args(argv)
    try:
        prompts = list(args.prompt)
        if args.prompts_file:
            path = Path(args.prompts_file)
            if path.is_dir():
                raise DataError(f"--prompts-file {path}: is a folder; give a text file, one prompt a line")
            if not path.is_file():
                raise DataError(f"--prompts-file {path}: prompts file not found")
            try:
                text = path.read_text(encoding="utf-8-sig")  # a byte order mark (Windows editors) is no text
            except UnicodeDecodeError as e:
                raise DataError(f"--prompts-file {path}: not UTF-8 text ({e}); convert it to UTF-8") from None
            from_file = [line for line in text.splitlines() if line.strip()]
            if not from_file:
                raise DataError(f"--prompts-file {path}: holds no prompt (it is empty, or only blank lines); write "
                                f"one prompt a line")
            prompts += from_file
        if not prompts:
            raise DataError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
        _check_sampling(args.temperature, args.top_k, args.top_p, cli=True)
        _check_seed(args.seed, cli=True)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens = {args.max_new_tokens} must be >= 1")
        device = resolve_device(args.device, setting="--device", warn_cpu=False)
        model, tokenizer, window = load_for_generation(args.checkpoint, args.tokenizer, device)
        for i, prompt in enumerate(prompts):
            if i:
                sys.stdout.write("\n")
            sys.stdout.write(prompt)
            sys.stdout.flush()
            for piece in stream_text(
                model,
                tokenizer,
                prompt,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k or None,
                top_p=args.top_p,
                seed=args.seed,
                use_cache=not args.no_cache,
                window=window,
            ):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
    except (TinyLMError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None  # exits 1 however main() is called
    except BrokenPipeError:  # e.g. `| head`: the reader has gone; exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    with ctrl_c_ends_quietly():  # as `tinylm generate` ends on Ctrl-C (tinylm.__main__)
        sys.exit(main())
